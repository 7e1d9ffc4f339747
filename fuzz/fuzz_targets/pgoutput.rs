//! Feeds arbitrary bytes to the pgoutput decoder, which must never panic (libFuzzer reports a panic as a
//! crash and saves the input under `artifacts/`).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = Bytes::copy_from_slice(data);
    let _ = kck::replication::pgoutput::decode(&data);
});
