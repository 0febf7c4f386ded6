#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nomoat_tests::fuzz::manifest(data));
