#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nomoat_tests::fuzz::weights_message(data));
