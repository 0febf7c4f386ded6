#![no_main]
//! GGUF headers. candle's parser panics on some headers; nomoat turns such
//! a panic into a typed error (`catch_unwind`), so the panic hook that
//! libFuzzer installs (abort at once) is replaced by a silent one: a panic
//! that escapes nomoat still reaches libFuzzer's own check and aborts.

libfuzzer_sys::fuzz_target!(
    init: { std::panic::set_hook(Box::new(|_| {})); },
    |data: &[u8]| nomoat_tests::fuzz::gguf_header(data)
);
