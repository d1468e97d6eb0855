//! The Yocto recipe's crate list (yocto/meta-rtcam/.../rtcam-crates.inc) must list exactly the
//! crates.io packages of Cargo.lock, with the same versions and checksums; otherwise the
//! offline Yocto build fetches the wrong crates or fails its checksum check.
//! Fix a failure with `python3 yocto/update-crates.py`.

use std::collections::BTreeMap;
use std::path::Path;

const INC: &str = "yocto/meta-rtcam/recipes-multimedia/rtcam/rtcam-crates.inc";
const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

/// "NAME-VERSION" -> checksum, for every crates.io package in Cargo.lock.
fn lock_crates(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.trim_start().strip_prefix('=')?;
                Some(rest.trim().trim_matches('"').to_string())
            })
        };
        let (Some(name), Some(version)) = (field("name"), field("version")) else {
            panic!("Cargo.lock: package without name/version: {block}");
        };
        match field("source") {
            None => continue, // rtcam itself
            Some(s) if s == CRATES_IO => {}
            Some(s) => panic!(
                "Cargo.lock: {name} {version} comes from {s}; the recipe only handles crates.io"
            ),
        }
        let checksum = field("checksum")
            .unwrap_or_else(|| panic!("Cargo.lock: {name} {version} has no checksum"));
        assert!(out.insert(format!("{name}-{version}"), checksum).is_none());
    }
    out
}

/// ("NAME-VERSION" set from crate:// URLs, "NAME-VERSION" -> sha256sum).
fn inc_crates(text: &str) -> (Vec<String>, BTreeMap<String, String>) {
    let mut urls = Vec::new();
    let mut sums = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("crate://crates.io/") {
            let rest = rest.trim_end_matches('\\').trim();
            let (name, version) = rest
                .split_once('/')
                .unwrap_or_else(|| panic!("{INC}: bad crate URL: {line}"));
            assert!(
                !version.contains(['/', ';', ' ']),
                "{INC}: unexpected URL form: {line}"
            );
            urls.push(format!("{name}-{version}"));
        } else if let Some(rest) = line.strip_prefix("SRC_URI[") {
            let (key, value) = rest
                .split_once("]")
                .unwrap_or_else(|| panic!("{INC}: bad checksum line: {line}"));
            let key = key
                .strip_suffix(".sha256sum")
                .unwrap_or_else(|| panic!("{INC}: only sha256sum flags are expected: {line}"));
            let value = value
                .trim()
                .strip_prefix('=')
                .map(str::trim)
                .unwrap_or_default();
            let value = value.trim_matches('"');
            assert!(
                sums.insert(key.to_string(), value.to_string()).is_none(),
                "{INC}: duplicate checksum for {key}"
            );
        }
    }
    (urls, sums)
}

#[test]
fn yocto_crate_list_matches_cargo_lock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lock = lock_crates(&std::fs::read_to_string(root.join("Cargo.lock")).unwrap());
    let inc_text = std::fs::read_to_string(root.join(INC)).unwrap();
    let (urls, sums) = inc_crates(&inc_text);
    assert!(
        lock.len() > 100,
        "suspiciously few crates parsed from Cargo.lock: {}",
        lock.len()
    );

    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for u in &urls {
        if !seen.insert(u.clone()) {
            problems.push(format!("{u}: listed twice in SRC_URI"));
        }
        if !lock.contains_key(u) {
            problems.push(format!("{u}: in SRC_URI but not in Cargo.lock"));
        }
    }
    for (key, sum) in &sums {
        match lock.get(key) {
            None => problems.push(format!("{key}: has a checksum but is not in Cargo.lock")),
            Some(want) if want != sum => {
                problems.push(format!("{key}: checksum {sum} != Cargo.lock's {want}"))
            }
            Some(_) => {}
        }
    }
    for key in lock.keys() {
        if !seen.contains(key) {
            problems.push(format!("{key}: in Cargo.lock but missing from SRC_URI"));
        }
        if !sums.contains_key(key) {
            problems.push(format!(
                "{key}: in Cargo.lock but has no SRC_URI[...sha256sum]"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{INC} disagrees with Cargo.lock (run `python3 yocto/update-crates.py`):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn parsers_catch_a_mismatch() {
    let lock = "version = 4\n\n[[package]]\nname = \"rtcam\"\nversion = \"0.1.0\"\n\n\
        [[package]]\nname = \"foo\"\nversion = \"1.2.3\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
        checksum = \"aa\"\n";
    let lock = lock_crates(lock);
    assert_eq!(lock.len(), 1);
    assert_eq!(lock["foo-1.2.3"], "aa");
    let (urls, sums) = inc_crates(
        "SRC_URI += \" \\\n    crate://crates.io/foo/1.2.4 \\\n\"\nSRC_URI[foo-1.2.3.sha256sum] = \"bb\"\n",
    );
    assert_eq!(urls, vec!["foo-1.2.4".to_string()]);
    assert_eq!(sums["foo-1.2.3"], "bb");
    assert!(!lock.contains_key(&urls[0]));
    assert_ne!(lock["foo-1.2.3"], sums["foo-1.2.3"]);
}
