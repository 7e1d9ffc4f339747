//! Feeds arbitrary text to the key template parser and the key parser (`/fetch/{key}`): the first line
//! holds templates separated by tabs, the other lines keys. Nothing may panic, and a parsed key's canonical
//! text parses back to the same key (see `kck::fuzzing::key`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kck::fuzzing::key(data));
