//! Shared by the web app's API and browser tests: a running `sd-lora ui`
//! on a free port in a scratch project folder (with a copy of the example
//! dataset, so captions can be edited), and a small HTTP/1.1 client that can
//! send any header (Host, Origin) the checks are about.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `sd-lora ui`, stopped (SIGINT, then kill) when dropped.
pub struct UiServer {
    pub child: Child,
    /// `http://127.0.0.1:PORT/` (with `?token=…` when one is used).
    pub url: String,
    pub port: u16,
    /// The project folder (the app's first root).
    pub root: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// Copies `from` into `to` recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The repository's example dataset.
pub fn example_dataset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/example_dataset")
}

impl UiServer {
    /// A project folder with `data/` (the example dataset) and the app on it.
    pub fn start(extra: &[&str]) -> UiServer {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        copy_dir(&example_dataset(), &root.join("data"));
        let mut s = Self::start_in(&root, extra);
        s._dir = Some(dir);
        s
    }

    /// The app in `root` with `extra` flags.
    pub fn start_in(root: &Path, extra: &[&str]) -> UiServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sd-lora"))
            .args(["ui", "--port", "0", "--no-browser"])
            .args(extra)
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sd-lora ui");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("ui printed nothing").unwrap();
        let url = first
            .strip_prefix("sd-lora ui: ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let port = url
            .trim_start_matches("http://")
            .split(['/', '?'])
            .next()
            .and_then(|h| h.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        UiServer {
            child,
            url,
            port,
            root: root.to_path_buf(),
            _dir: None,
        }
    }

    /// The `Host` header of this app.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A request with the default headers (own Host and Origin, JSON).
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> Response {
        self.request("POST", path, Some(body.to_string().as_bytes()), &[])
    }

    /// A request; `headers` replace the defaults of the same name (an
    /// empty value leaves that header out).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Response {
        let host = self.host();
        let origin = format!("http://{host}");
        let mut all: Vec<(String, String)> = vec![
            ("Host".into(), host.clone()),
            ("Connection".into(), "close".into()),
        ];
        if body.is_some() {
            all.push(("Content-Type".into(), "application/json".into()));
            all.push(("Origin".into(), origin));
        }
        for (k, v) in headers {
            all.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
            if !v.is_empty() {
                all.push((k.to_string(), v.to_string()));
            }
        }
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        for (k, v) in &all {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.unwrap_or_default();
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        // A body the server refuses early may not all be read: ignore EPIPE.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        Response::parse(&raw)
    }

    /// Reads the job's events from `/api/job/events?from=FROM` until one
    /// of type `exit` (or the timeout).
    pub fn events_until_exit(&self, from: u64, timeout: Duration) -> Vec<serde_json::Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        let req = format!(
            "GET /api/job/events?from={from} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            self.host()
        );
        s.write_all(req.as_bytes()).unwrap();
        let started = Instant::now();
        let mut events = Vec::new();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        while started.elapsed() < timeout {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // Chunked encoding: data lines stand on their own lines.
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                let exit = v["type"] == "exit";
                events.push(v);
                if exit {
                    return events;
                }
            }
        }
        panic!("no exit event within {timeout:?}; got {events:#?}");
    }

    /// Sends SIGINT (Ctrl-C) and waits for the app to exit.
    pub fn interrupt_and_wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "the app did not stop within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for UiServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.interrupt_and_wait_quietly();
        }
    }
}

impl UiServer {
    fn interrupt_and_wait_quietly(&mut self) -> Option<()> {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        for _ in 0..100 {
            if self.child.try_wait().ok()?.is_some() {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Some(())
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8]) -> Response {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut body = raw[split + 4..].to_vec();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v == "chunked")
        {
            body = dechunk(&body);
        }
        Response {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}
