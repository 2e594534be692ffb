#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    floodgate_proxy::fuzzing::embeddings_request(data);
});
