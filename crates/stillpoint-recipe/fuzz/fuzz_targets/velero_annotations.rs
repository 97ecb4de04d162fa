//! Arbitrary annotation maps (lines `key=value`) through the Velero reader: never a panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use stillpoint_recipe::velero::parse_annotations;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let map: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let _ = parse_annotations(&map);
});
