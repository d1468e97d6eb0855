//! The Yocto recipe's generated files agree with this checkout: rtcam-crates.inc lists exactly
//! the crates.io packages of Cargo.lock (versions, checksums), SRCREV in rtcam-release.inc is an
//! ancestor of HEAD with the same Cargo.lock, and its licences cover every crate linked into
//! the device build. Otherwise the offline Yocto build fetches the wrong crates, builds other
//! sources than the crate list describes, or ships an incomplete licence list.
//! Fix a failure with `python3 yocto/update-crates.py` (after committing; see its --help).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

const INC: &str = "yocto/meta-rtcam/recipes-multimedia/rtcam/rtcam-crates.inc";
const RELEASE_INC: &str = "yocto/meta-rtcam/recipes-multimedia/rtcam/rtcam-release.inc";
/// The device build's targets, as in yocto/update-crates.py.
const DEVICE_TARGETS: [&str; 3] = [
    "aarch64-unknown-linux-gnu",
    "armv7-unknown-linux-gnueabihf",
    "x86_64-unknown-linux-gnu",
];
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

/// `NAME = "value"` assignments of a generated .inc; `\`-continued values are joined, and
/// runs of whitespace become one space.
fn inc_vars(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some((name, value)) = line.split_once(" = ") else {
            continue;
        };
        if name.starts_with('#') || name.contains(' ') {
            continue;
        }
        let mut value = value.trim().trim_start_matches('"').to_string();
        while value.ends_with('\\') {
            value.pop();
            value.push(' ');
            value.push_str(lines.next().unwrap_or("").trim());
        }
        let value = value.trim().trim_end_matches('"');
        out.insert(
            name.to_string(),
            value.split_whitespace().collect::<Vec<_>>().join(" "),
        );
    }
    out
}

fn git(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("MISSING: git (needed to check SRCREV): {e}"))
}

#[test]
fn srcrev_is_an_ancestor_of_head_with_the_same_cargo_lock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let vars = inc_vars(&std::fs::read_to_string(root.join(RELEASE_INC)).unwrap());
    let srcrev = vars.get("SRCREV").expect("rtcam-release.inc sets SRCREV");
    assert!(
        srcrev.len() == 40 && srcrev.bytes().all(|b| b.is_ascii_hexdigit()),
        "SRCREV {srcrev:?} is not a full commit id"
    );
    let inside = git(root, &["rev-parse", "--is-inside-work-tree"]);
    assert!(
        inside.status.success(),
        "MISSING: a git checkout at {} (SRCREV can only be checked against its history)",
        root.display()
    );
    let fix = "run `python3 yocto/update-crates.py` on a commit with this Cargo.lock and commit its output";
    assert!(
        git(root, &["cat-file", "-e", &format!("{srcrev}^{{commit}}")])
            .status
            .success(),
        "SRCREV {srcrev} is not a commit of this repository (rebased or squashed away? shallow clone?): {fix}"
    );
    assert!(
        git(root, &["merge-base", "--is-ancestor", srcrev, "HEAD"])
            .status
            .success(),
        "SRCREV {srcrev} is not an ancestor of HEAD: {fix}"
    );
    let lock_then = git(root, &["show", &format!("{srcrev}:Cargo.lock")]);
    assert!(
        lock_then.status.success(),
        "SRCREV {srcrev} has no Cargo.lock"
    );
    let lock_now = std::fs::read(root.join("Cargo.lock")).unwrap();
    assert!(
        lock_then.stdout == lock_now,
        "Cargo.lock differs from SRCREV {srcrev}'s, so BitBake would build other crates than rtcam-crates.inc lists: {fix}"
    );
}

/// The licence identifiers an SPDX expression names.
fn licence_names(expression: &str) -> BTreeSet<String> {
    expression
        .split(|c: char| c.is_whitespace() || "()/".contains(c))
        .filter(|w| !w.is_empty() && !["AND", "OR", "WITH"].contains(w))
        .map(str::to_string)
        .collect()
}

/// "NAME-VERSION" -> licence of every crates.io package `cargo tree` says is linked into the
/// device build for `target`.
fn linked_crates(root: &Path, target: &str) -> BTreeMap<String, String> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let out = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "-e",
            "normal,no-proc-macro",
            "--no-default-features",
        ])
        .args(["--target", target, "--prefix", "none", "--no-dedupe"])
        .args(["--format", "{p}|{l}"])
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("MISSING: {cargo} (cargo tree): {e}"));
    assert!(
        out.status.success(),
        "cargo tree --target {target} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut crates = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let (package, licence) = line.split_once('|').expect("cargo tree: {p}|{l}");
        let fields: Vec<&str> = package.split_whitespace().collect();
        if fields.len() != 2 {
            continue; // "rtcam v0.1.0 (/path)": rtcam itself
        }
        let version = fields[1].strip_prefix('v').expect("cargo tree: vVERSION");
        // The bundled libjpeg-turbo's licences (yocto/update-crates.py, BUNDLED_LICENCES).
        let licence = match fields[0] {
            "turbojpeg-sys" => format!("({licence}) AND IJG AND BSD-3-Clause AND Zlib"),
            _ => licence.to_string(),
        };
        crates.insert(format!("{}-{version}", fields[0]), licence);
    }
    crates
}

#[test]
fn licences_cover_every_linked_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let vars = inc_vars(&std::fs::read_to_string(root.join(RELEASE_INC)).unwrap());
    let mut crates = BTreeMap::new();
    for target in DEVICE_TARGETS {
        crates.extend(linked_crates(root, target));
    }
    assert!(
        crates.len() > 100,
        "suspiciously few crates from cargo tree: {}",
        crates.len()
    );
    let declared = licence_names(&vars["RTCAM_CRATES_LICENSE_SPDX"]);
    let files = &vars["LIC_FILES_CHKSUM"];
    let dirs: BTreeSet<&str> = files
        .split_whitespace()
        .filter_map(|e| e.strip_prefix("file://${CARGO_VENDORING_DIRECTORY}/"))
        .filter_map(|e| e.split_once('/').map(|(dir, _)| dir))
        .collect();
    let mut problems = Vec::new();
    for (krate, licence) in &crates {
        for name in licence_names(licence) {
            if !declared.contains(&name) {
                problems.push(format!(
                    "{krate}: {name} ({licence}) is not in RTCAM_CRATES_LICENSE_SPDX"
                ));
            }
        }
        if !dirs.contains(krate.as_str()) {
            problems.push(format!("{krate}: no licence file in LIC_FILES_CHKSUM"));
        }
    }
    for dir in &dirs {
        if !crates.contains_key(*dir) {
            problems.push(format!("{dir}: in LIC_FILES_CHKSUM but not linked"));
        }
    }
    for own in ["file://LICENSE-MIT;", "file://LICENSE-APACHE;"] {
        if !files.contains(own) {
            problems.push(format!("LIC_FILES_CHKSUM lacks rtcam's {own}"));
        }
    }
    for (name, syntax) in [
        ("RTCAM_LICENSE_OE", "OE"),
        ("RTCAM_CRATES_LICENSE_OE", "OE"),
    ] {
        let spdx = name.replace("_OE", "_SPDX");
        let oe_as_spdx = vars[name].replace(" & ", " AND ").replace(" | ", " OR ");
        if oe_as_spdx != vars[&spdx] {
            problems.push(format!(
                "{name} ({syntax} syntax) says something else than {spdx}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{RELEASE_INC} disagrees with the crates linked into the device build (run `python3 yocto/update-crates.py`):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn licence_parsing_helpers() {
    assert_eq!(
        licence_names("(MIT OR Apache-2.0) AND Unicode-3.0"),
        ["Apache-2.0", "MIT", "Unicode-3.0"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        licence_names("MIT/Apache-2.0"),
        ["Apache-2.0", "MIT"].map(String::from).into()
    );
    let vars = inc_vars("# c\nSRCREV = \"abc\"\nX = \" \\\n    a \\\n    b \\\n\"\n");
    assert_eq!(vars["SRCREV"], "abc");
    assert_eq!(vars["X"], "a b");
}
