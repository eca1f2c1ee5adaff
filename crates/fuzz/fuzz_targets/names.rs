//! libFuzzer driver of [`drover_fuzz::names`].
#![no_main]

use libfuzzer_sys::Corpus;

libfuzzer_sys::fuzz_target!(|data: &[u8]| -> Corpus {
    if drover_fuzz::names(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
