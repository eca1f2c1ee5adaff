//! libFuzzer driver of [`drover_fuzz::api::Api`]: one server for the whole run.
#![no_main]

use std::sync::OnceLock;

use drover_fuzz::api::Api;
use libfuzzer_sys::Corpus;

static API: OnceLock<Api> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| -> Corpus {
    if API.get_or_init(Api::start).run(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
