//! libFuzzer driver of [`drover_fuzz::event`].
#![no_main]

use libfuzzer_sys::Corpus;

libfuzzer_sys::fuzz_target!(|data: &[u8]| -> Corpus {
    if drover_fuzz::event(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
