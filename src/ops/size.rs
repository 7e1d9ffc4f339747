//! Byte sizes as people write them (`1GB`, `512 MiB`, `0`) and as kck prints them (`1.5 GiB`).
//!
//! Units follow Postgres's own settings (`max_slot_wal_keep_size = 10GB`): `kB`, `MB`, `GB` and `TB` are
//! powers of 1024, like `KiB`, `MiB`, `GiB` and `TiB`. A bare number is bytes.

/// Parse a size such as `1GB`, `512MB`, `64 MiB` or `1048576`.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let bad = || {
        format!(
            "'{text}' is not a size: write a number with a unit, such as 512MB, 1GB or 10GB (kB, MB, GB, \
             TB are powers of 1024, as in postgresql.conf; a bare number is bytes)"
        )
    };
    let number: f64 = number.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `1.5 GiB`, `300 MiB`, `12 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_postgresql_conf() {
        assert_eq!(parse_byte_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_byte_size("512 MB"), Ok(512 << 20));
        assert_eq!(parse_byte_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_byte_size("1.5GB"), Ok(3 << 29));
        assert_eq!(parse_byte_size("0"), Ok(0));
        assert_eq!(parse_byte_size("2048"), Ok(2048));
        assert_eq!(parse_byte_size("10kB"), Ok(10 << 10));
        for bad in ["", "GB", "1 parsec", "-1GB", "1e999GB"] {
            let e = parse_byte_size(bad).unwrap_err();
            assert!(e.contains("not a size"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_print_short() {
        assert_eq!(format_bytes(12), "12 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(300 << 20), "300 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }
}
