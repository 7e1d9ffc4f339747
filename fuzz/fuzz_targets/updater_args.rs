//! Feeds arbitrary request bodies to the updater argument parser (`POST /update/{name}`), against an
//! updater whose parameters the first bytes choose. Nothing may panic, and accepted arguments fit their
//! declared types (see `kck::fuzzing::updater_args`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kck::fuzzing::updater_args(data));
