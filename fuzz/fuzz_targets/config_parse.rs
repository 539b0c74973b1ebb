//! `swarmgate::config::parse`, what `swarmgate check --config FILE` reads a config with
//! (`config::load` is `read_to_string` then `parse`), on arbitrary text and
//! `SWARMGATE_*` variables; then `Config::summary` and every problem's text.
//!
//! Input: `NAME=VALUE` lines of environment, a NUL byte, then the file (UTF-8, lossy).
//! Without a NUL byte the whole input is the file and the environment is empty.
//!
//! Checked: no panic; a problem has a location and a message; parsing is deterministic.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use swarmgate::config;

fuzz_target!(|data: &[u8]| {
    let (env_part, file) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let mut env = BTreeMap::new();
    for line in String::from_utf8_lossy(env_part).lines() {
        if let Some((k, v)) = line.split_once('=') {
            // Only SWARMGATE_* variables are read; make most of them that.
            let k = if k.starts_with("SWARMGATE_") { k.to_string() } else { format!("SWARMGATE_{k}") };
            env.insert(k, v.to_string());
        }
    }
    let text = String::from_utf8_lossy(file);
    let path = Path::new("fuzz.toml");
    let first = config::parse(path, &text, &env);
    match &first {
        Ok(c) => {
            let s = c.summary();
            assert!(s.starts_with("config fuzz.toml is valid"));
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "Err with no problem");
            for p in problems {
                assert!(!p.location.is_empty() && !p.message.is_empty(), "{p:?}");
                let _ = p.to_string();
            }
        }
    }
    let again = config::parse(path, &text, &env);
    match (&first, &again) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b, "problems differ between two reads"),
        _ => panic!("two reads of one config disagree"),
    }
});
