//! A minimal blocking HTTP/1.1 client with keep-alive: enough for `/fetch` and `/healthz`, with no
//! dependency and little overhead of its own (the freshness prober polls with it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

pub struct Http {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http { addr, conn: None }
    }

    fn connect(&mut self) -> Result<&mut BufReader<TcpStream>> {
        if self.conn.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            self.conn = Some(BufReader::new(stream));
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// GET `path`; reconnects once if the kept-alive connection was closed.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        match self.try_get(path) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.conn = None;
                self.try_get(path)
            }
        }
    }

    fn try_get(&mut self, path: &str) -> Result<Response> {
        let host = self.addr;
        let conn = self.connect()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        conn.get_mut().write_all(request.as_bytes())?;
        let result = read_response(conn);
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

fn read_response(conn: &mut BufReader<TcpStream>) -> Result<Response> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        bail!("connection closed");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length = None;
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            bail!("connection closed in headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
            if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("chunked responses are not supported by this client");
            }
        }
    }
    let mut body = vec![0; length.context("response without content-length")?];
    conn.read_exact(&mut body)?;
    Ok(Response { status, body })
}

/// Fetch every path once over `connections` parallel connections; returns the number of non-200 answers.
pub fn fetch_all(addr: SocketAddr, paths: &[String], connections: usize) -> Result<usize> {
    let chunk = paths.len().div_ceil(connections.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || -> Result<usize> {
                    let mut http = Http::new(addr);
                    let mut bad = 0;
                    for p in part {
                        if http.get(p)?.status != 200 {
                            bad += 1;
                        }
                    }
                    Ok(bad)
                })
            })
            .collect();
        let mut bad = 0;
        for h in handles {
            bad += h
                .join()
                .map_err(|_| anyhow::anyhow!("fetch thread panicked"))??;
        }
        Ok(bad)
    })
}

/// Wait until kck's `/healthz` answers, at most `timeout`.
pub fn wait_healthy(addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_answers("kck", addr, "/healthz", timeout)
}

/// Wait until `server` answers `path` with 200, at most `timeout`.
pub fn wait_answers(server: &str, addr: SocketAddr, path: &str, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut http = Http::new(addr);
        if matches!(http.get(path), Ok(r) if r.status == 200) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{server} did not answer {path} on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
