//! The web app's HTTP API against a running `sd-lora ui` (the real binary
//! on a free port): what the page does — dataset report and caption
//! editing, config check with the CLI's messages, a training run followed
//! over Server-Sent Events, stop and resume, generation, LoRA tools — and
//! each safety rule: Host and Origin checks, token, path confinement
//! (`..`, absolute paths, symlinks), body limit, one run at a time, Ctrl-C.

mod ui_support;

use serde_json::{Value, json};
use std::time::Duration;
use ui_support::UiServer;

/// A short quickstart-like run on the built-in tiny model over `data/`.
fn tiny_config(steps: u64, out: &str) -> Value {
    json!({
        "model": {"path": "builtin:tiny"},
        "network": {"rank": 4, "alpha": 4.0},
        "train": {"steps": steps, "batch_size": 2, "unet_lr": 0.001, "seed": 1},
        "dataset": {"resolution": 64, "bucket_step": 32, "min_bucket_side": 32,
                    "max_bucket_side": 128, "min_image_side": 32,
                    "subsets": [{"path": "data", "kind": "instance"}]},
        "output": {"dir": out, "name": "ui_lora", "save_every": 0,
                   "sample_every": steps, "sample_steps": 2,
                   "sample_prompts": ["ohwx robot", "ohwx robot on a beach"]}
    })
}

#[test]
fn page_and_static_assets_are_served_with_safe_headers() {
    let ui = UiServer::start(&[]);
    let r = ui.get("/");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("<title>"), "{}", r.text());
    assert!(
        r.header("content-security-policy")
            .is_some_and(|c| c.contains("frame-ancestors 'none'"))
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    for (path, ty) in [("/app.js", "text/javascript"), ("/app.css", "text/css")] {
        let r = ui.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").is_some_and(|c| c.starts_with(ty)),
            "{path}"
        );
    }
    let r = ui.get("/api/nope");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let info = ui.get("/api/info").json();
    assert_eq!(info["roots"].as_array().unwrap().len(), 1, "{info}");
    assert!(
        info["presets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "quickstart")
    );
    let schema = ui.get("/api/schema").json();
    let tables: Vec<&str> = schema["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["model", "network", "train", "dataset", "output"]);
}

/// DNS rebinding: a foreign Host is refused, on every path.
#[test]
fn foreign_host_names_are_refused() {
    let ui = UiServer::start(&[]);
    for host in ["evil.example", "evil.example:80", "localhost:1"] {
        let r = ui.request("GET", "/api/info", None, &[("Host", host)]);
        assert_eq!(r.status, 421, "{host}: {}", r.text());
    }
    let r = ui.request(
        "GET",
        "/",
        None,
        &[("Host", &format!("localhost:{}", ui.port))],
    );
    assert_eq!(r.status, 200);
}

/// CSRF: a state change from another origin, a cross-site fetch or a form
/// post is refused before anything happens; bodies over the limit are 413.
#[test]
fn cross_site_requests_and_large_bodies_are_refused() {
    let ui = UiServer::start(&[]);
    let caption = ui.root.join("data/10_ohwx robot/robot_01.txt");
    let body = json!({"image": "data/10_ohwx robot/robot_01.png", "text": "pwned"}).to_string();
    let r = ui.request(
        "POST",
        "/api/caption",
        Some(body.as_bytes()),
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = ui.request(
        "POST",
        "/api/caption",
        Some(body.as_bytes()),
        &[("Sec-Fetch-Site", "cross-site")],
    );
    assert_eq!(r.status, 403);
    let r = ui.request(
        "POST",
        "/api/caption",
        Some(body.as_bytes()),
        &[("Content-Type", "text/plain")],
    );
    assert_eq!(r.status, 415);
    assert!(!caption.exists(), "a refused request wrote the caption");
    let big = json!({"image": "x.png", "text": "a".repeat(2 << 20)}).to_string();
    let r = ui.request("POST", "/api/caption", Some(big.as_bytes()), &[]);
    assert_eq!(r.status, 413, "{}", r.text());
    // Malformed requests get a JSON message too.
    let r = ui.request("POST", "/api/caption", Some(b"not json"), &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("refused"));
    let r = ui.get("/api/dataset");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("path"));
    // The same request from the page itself works.
    let r = ui.request("POST", "/api/caption", Some(body.as_bytes()), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::read_to_string(&caption).unwrap(), "pwned\n");
}

/// A token, given or generated for a non-loopback address, is needed by
/// every request; the page opened with it gets a cookie that carries it.
#[test]
fn token_guards_every_request() {
    let ui = UiServer::start(&["--token", "s3cret-token"]);
    assert!(ui.url.ends_with("/?token=s3cret-token"), "{}", ui.url);
    assert_eq!(ui.get("/").status, 401);
    assert_eq!(ui.get("/api/info").status, 401);
    assert_eq!(ui.get("/api/info?token=wrong-token!").status, 401);
    let r = ui.get("/?token=s3cret-token");
    assert_eq!(r.status, 200);
    let cookie = r.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    assert_eq!(
        ui.request("GET", "/api/info", None, &[("Cookie", pair)])
            .status,
        200
    );
    assert_eq!(
        ui.request(
            "GET",
            "/api/info",
            None,
            &[("Authorization", "Bearer s3cret-token")]
        )
        .status,
        200
    );
    drop(ui);
    // Another interface: a random token is made and printed in the URL.
    let ui = UiServer::start(&["--listen", "0.0.0.0"]);
    let token = ui
        .url
        .split("?token=")
        .nth(1)
        .expect("no token in the URL")
        .to_string();
    assert!(token.len() >= 32, "{token}");
    assert_eq!(
        ui.request("GET", "/api/info", None, &[("Host", "192.168.1.20:1")])
            .status,
        401
    );
    let auth = format!("Bearer {token}");
    assert_eq!(
        ui.request(
            "GET",
            "/api/info",
            None,
            &[("Host", "192.168.1.20:1"), ("Authorization", &auth)]
        )
        .status,
        200
    );
    // A too-short token is refused at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(["ui", "--no-browser", "--port", "0", "--token", "short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 8 characters"));
}

/// Every path is confined to the roots: `..`, absolute paths elsewhere and
/// symlinks that lead out are refused (403), in listings, files, datasets,
/// captions, configs and LoRA tools.
#[test]
fn paths_outside_the_roots_are_refused() {
    let ui = UiServer::start(&[]);
    let outside = ui.root.parent().unwrap().join("secret");
    std::fs::create_dir_all(&outside).unwrap();
    image::RgbImage::new(8, 8)
        .save(outside.join("s.png"))
        .unwrap();
    std::os::unix::fs::symlink(&outside, ui.root.join("data/link")).unwrap();
    let out_abs = outside.display().to_string();
    for path in [
        "/api/fs?path=..".to_string(),
        "/api/fs?path=%2Fetc".to_string(),
        format!("/api/fs?path={}", out_abs),
        "/api/file?path=data/link/s.png".to_string(),
        "/api/thumb?path=data%2F..%2F..%2Fsecret%2Fs.png".to_string(),
        "/api/dataset?path=data/link".to_string(),
    ] {
        let r = ui.get(&path);
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains("refused")
                || r.json()["error"].as_str().unwrap().contains("outside"),
            "{}",
            r.text()
        );
    }
    for (ep, body) in [
        (
            "/api/caption",
            json!({"image": "data/link/s.png", "text": "x"}),
        ),
        (
            "/api/config/save",
            json!({"path": "../evil.toml", "config": {}}),
        ),
        ("/api/config/load", json!({"path": "/etc/passwd.toml"})),
        ("/api/lora/inspect", json!({"path": "/etc/passwd"})),
        (
            "/api/lora/convert",
            json!({"input": "a.safetensors", "output": "data/link/b.safetensors", "to": "peft"}),
        ),
        ("/api/generate", json!({"model": "/etc", "prompt": "x"})),
    ] {
        let r = ui.post(ep, &body);
        assert_eq!(r.status, 403, "{ep}: {}", r.text());
    }
    // The listing of the root leaves the symlink out.
    let listing = ui.get("/api/fs?path=data").json();
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"10_ohwx robot") && !names.contains(&"link"),
        "{names:?}"
    );
    // A config whose dataset lies outside: the error names the key.
    let mut cfg = tiny_config(2, "output/x");
    cfg["dataset"]["subsets"][0]["path"] = json!(out_abs);
    let check = ui.post("/api/config/check", &json!({"config": cfg})).json();
    assert_eq!(check["ok"], false);
    assert_eq!(check["errors"][0]["key"], "dataset.subsets[0].path");
    assert_eq!(check["errors"][0]["field"], "dataset.subsets");
    let r = ui.post("/api/train/start", &json!({"config": cfg}));
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(ui.get("/api/job").json().is_null(), "something started");
}

/// The dataset view's report, thumbnails, identifier advice and caption
/// editing (atomic, a new `.txt` beside an image that had none).
#[test]
fn dataset_report_thumbnails_and_captions() {
    let ui = UiServer::start(&[]);
    let r = ui.get("/api/dataset?path=data&resolution=64");
    assert_eq!(r.status, 200, "{}", r.text());
    let d = r.json();
    assert_eq!(d["summary"]["images"], 8);
    assert_eq!(d["subsets"][0]["repeats"], 10);
    assert_eq!(d["images"].as_array().unwrap().len(), 8);
    assert!(d["advice"].is_array());
    let img = d["images"][1]["path"].as_str().unwrap().to_string();
    assert_eq!(d["images"][1]["caption_source"], "folder");
    let t = ui.get(&format!(
        "/api/thumb?path={}&size=64",
        img.replace(' ', "%20")
    ));
    assert_eq!(t.status, 200);
    assert_eq!(t.header("content-type"), Some("image/jpeg"));
    let thumb = image::load_from_memory(&t.body).unwrap();
    assert!(thumb.width() <= 64 && thumb.height() <= 64);
    let r = ui.post(
        "/api/caption",
        &json!({"image": img, "text": "ohwx robot, edited "}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let txt = std::path::Path::new(&img).with_extension("txt");
    assert_eq!(
        std::fs::read_to_string(&txt).unwrap(),
        "ohwx robot, edited\n"
    );
    let leftovers: Vec<_> = std::fs::read_dir(txt.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    let d = ui.get("/api/dataset?path=data&resolution=64").json();
    assert_eq!(d["images"][1]["caption"], "ohwx robot, edited");
    assert_eq!(d["images"][1]["caption_source"], "file");
    let a = ui
        .get("/api/identifier?prompt=a%20photo%20of%20zwx%20dog")
        .json();
    assert!(a["advice"].is_array());
    // Not a folder / not an image: clear refusals.
    let r = ui.get("/api/dataset?path=missing");
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("no such folder")
    );
    let r = ui.post(
        "/api/caption",
        &json!({"image": "data/nothing.png", "text": "x"}),
    );
    assert_eq!(r.status, 404);
}

/// The config check gives the CLI's messages with their keys, the memory
/// estimate, the TOML and the equivalent command line; load and save
/// round-trip a TOML file that the CLI reads.
#[test]
fn config_check_load_and_save() {
    let ui = UiServer::start(&[]);
    let good = tiny_config(4, "output/check");
    let c = ui
        .post("/api/config/check", &json!({"config": good}))
        .json();
    assert_eq!(c["ok"], true, "{c}");
    assert!(c["estimate"].as_str().unwrap().contains("MiB"), "{c}");
    assert!(c["report"].as_str().unwrap().contains("# Memory estimate"));
    assert!(c["toml"].as_str().unwrap().contains("[train]"));
    assert!(
        c["command"]
            .as_str()
            .unwrap()
            .starts_with("sd-lora train --set ")
    );
    for (key, value, msg) in [
        (
            "train.steps",
            json!(-3),
            "`train.steps` in the form: invalid value",
        ),
        ("network.rank", json!(0), "must be at least 1"),
        ("train.stepz", json!(3), "unknown field `stepz`"),
    ] {
        let mut bad = good.clone();
        let (t, k) = key.split_once('.').unwrap();
        bad[t][k] = value;
        let c = ui.post("/api/config/check", &json!({"config": bad})).json();
        assert_eq!(c["ok"], false, "{key}");
        let e = &c["errors"][0];
        assert_eq!(e["key"], key, "{c}");
        assert!(e["message"].as_str().unwrap().contains(msg), "{c}");
    }
    let mut missing = good.clone();
    missing["model"]["path"] = json!("models/none.safetensors");
    let c = ui
        .post("/api/config/check", &json!({"config": missing}))
        .json();
    assert_eq!(c["ok"], false);
    assert!(
        c["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("none.safetensors"),
        "{c}"
    );
    // Save, check the CLI reads the file, load it back.
    let r = ui.post(
        "/api/config/save",
        &json!({"path": "configs/mine.toml", "config": good}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let file = ui.root.join("configs/mine.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("steps = 4"), "{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(["train", "--config", "configs/mine.toml", "--dry-run"])
        .current_dir(&ui.root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded = ui
        .post("/api/config/load", &json!({"path": "configs/mine.toml"}))
        .json();
    assert_eq!(loaded["config"]["train"]["steps"], 4);
    let p = loaded["config"]["dataset"]["subsets"][0]["path"]
        .as_str()
        .unwrap();
    assert_eq!(
        std::path::Path::new(p),
        ui.root.join("data").canonicalize().unwrap()
    );
    let r = ui.post(
        "/api/config/save",
        &json!({"path": "configs/mine.txt", "config": good}),
    );
    assert_eq!(r.status, 400);
    std::fs::write(ui.root.join("broken.toml"), "[train\nsteps = ").unwrap();
    let r = ui.post("/api/config/load", &json!({"path": "broken.toml"}));
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("not valid TOML")
    );
    let q = ui.get("/api/presets/quickstart").json();
    assert_eq!(q["config"]["model"]["path"], "builtin:tiny");
    assert!(q["config"]["dataset"].get("subsets").is_none());
    assert_eq!(ui.get("/api/presets/nope").status, 404);
}

/// A run from start to end, followed over SSE; a second start is refused
/// while it runs; a page that reconnects gets every event again; then
/// generation with the trained LoRA, the gallery, inspect and convert.
#[test]
fn train_follow_generate_and_tools() {
    let ui = UiServer::start(&[]);
    let r = ui.post(
        "/api/train/start",
        &json!({"config": tiny_config(6, "output/run")}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let job = r.json();
    assert_eq!(job["kind"], "train");
    assert_eq!(job["status"], "running");
    let second = ui.post(
        "/api/train/start",
        &json!({"config": tiny_config(6, "output/run2")}),
    );
    assert_eq!(second.status, 409, "{}", second.text());
    assert!(
        second.json()["error"]
            .as_str()
            .unwrap()
            .contains("already going")
    );
    let gen_busy = ui.post(
        "/api/generate",
        &json!({"model": "builtin:tiny", "prompt": "x"}),
    );
    assert_eq!(gen_busy.status, 409);
    assert!(
        !ui.root.join("output/run2").exists(),
        "the refused run started"
    );
    let events = ui.events_until_exit(0, Duration::from_secs(300));
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types[0], "started");
    assert_eq!(*types.last().unwrap(), "exit");
    assert_eq!(events.last().unwrap()["status"], "finished", "{events:#?}");
    let steps: Vec<&Value> = events.iter().filter(|e| e["type"] == "step").collect();
    assert_eq!(steps.len(), 6);
    assert!(
        steps
            .iter()
            .all(|s| s["loss"].as_f64().is_some_and(f64::is_finite))
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let preview = events
        .iter()
        .find(|e| e["type"] == "preview")
        .expect("no preview event");
    let grid = preview["grid"].as_str().unwrap();
    assert_eq!(ui.get(&format!("/api/file?path={grid}")).status, 200);
    let done = events
        .iter()
        .find(|e| e["type"] == "done")
        .expect("no done event");
    let lora = done["lora_file"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&lora).is_file());
    // Reattach: the job and its events are still there for a new page.
    let state = ui.get("/api/job").json();
    assert_eq!(state["status"], "finished");
    assert_eq!(state["events"].as_array().unwrap().len(), events.len());
    let again = ui.events_until_exit(seqs[3], Duration::from_secs(10));
    assert_eq!(again.len(), events.len() - 3);

    // Generate with the LoRA; the gallery shows it with its parameters.
    let r = ui.post(
        "/api/generate",
        &json!({
        "model": "builtin:tiny", "loras": [{"path": lora, "weight": 0.8}],
        "prompt": "ohwx robot", "negative": "", "sampler": "euler_a", "steps": 3,
        "cfg": 5.0, "seed": 11, "width": 64, "height": 64, "num_images": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let next = seqs.last().unwrap() + 1;
    let events = ui.events_until_exit(next, Duration::from_secs(120));
    assert_eq!(events.last().unwrap()["status"], "finished", "{events:#?}");
    let images = events
        .iter()
        .find(|e| e["type"] == "images")
        .expect("no images event");
    assert_eq!(images["files"].as_array().unwrap().len(), 1);
    let g = ui.get("/api/gallery").json();
    let first = &g["images"][0];
    assert_eq!(first["settings"]["prompt"], "ohwx robot");
    assert_eq!(first["settings"]["seed"], 11);
    assert_eq!(
        first["settings"]["loras"][0]["path"],
        lora.as_str(),
        "{first}"
    );
    assert!(
        first["parameters"]
            .as_str()
            .unwrap()
            .contains("<lora:ui_lora:0.8>"),
        "{first}"
    );

    // LoRA tools.
    let info = ui.post("/api/lora/inspect", &json!({"path": lora})).json();
    assert_eq!(info["kind"], "lora", "{info}");
    assert_eq!(info["format"], "kohya");
    let r = ui.post(
        "/api/lora/convert",
        &json!({"input": lora, "output": "output/peft.safetensors", "to": "peft"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(ui.root.join("output/peft.safetensors").is_file());
    let r = ui.post(
        "/api/lora/resize",
        &json!({"input": lora, "output": "output/r2.safetensors", "rank": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = ui.post("/api/lora/convert", &json!({"input": "output/none.safetensors", "output": "output/x.safetensors", "to": "peft"}));
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("none.safetensors")
    );
}

/// Stop saves a checkpoint and the state (status "stopped"); resume goes on
/// from there to the end; Ctrl-C on the app stops a running job cleanly.
#[test]
fn stop_resume_and_ctrl_c() {
    let mut ui = UiServer::start(&[]);
    let cfg = tiny_config(400, "output/long");
    let r = ui.post("/api/train/start", &json!({"config": cfg}));
    assert_eq!(r.status, 200, "{}", r.text());
    // Wait for the first step, then stop.
    let started = std::time::Instant::now();
    loop {
        let s = ui.get("/api/job").json();
        if s["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "step")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = ui.post("/api/job/stop", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let events = ui.events_until_exit(0, Duration::from_secs(120));
    assert_eq!(events.last().unwrap()["status"], "stopped", "{events:#?}");
    let last_step = events.iter().rfind(|e| e["type"] == "step").unwrap()["step"]
        .as_u64()
        .unwrap();
    assert!(last_step < 400);
    let saved: Vec<_> = std::fs::read_dir(ui.root.join("output/long"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-step"))
        .collect();
    assert!(!saved.is_empty(), "no checkpoint after stop");
    assert_eq!(ui.post("/api/job/stop", &json!({})).status, 409);

    // Resume: the run goes on from the saved step.
    let r = ui.post("/api/train/start", &json!({"config": cfg, "resume": true}));
    assert_eq!(r.status, 200, "{}", r.text());
    let from = events.last().unwrap()["seq"].as_u64().unwrap() + 1;
    let mut first_step = None;
    let started = std::time::Instant::now();
    while first_step.is_none() {
        let s = ui.get("/api/job").json();
        first_step = s["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "step")
            .map(|e| e["step"].as_u64().unwrap());
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step after resume: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        first_step,
        Some(last_step + 1),
        "resume did not continue from the checkpoint"
    );
    let _ = from;
    // Ctrl-C on the app: the run is asked to stop, saves, and the app exits 0.
    let status = ui.interrupt_and_wait(Duration::from_secs(120));
    assert!(status.success(), "{status:?}");
    let after = std::fs::read_dir(ui.root.join("output/long"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("-step"))
        .count();
    assert!(
        after > saved.len(),
        "no checkpoint from the Ctrl-C stop: {saved:?}"
    );
}

/// No endpoint runs a shell: text the page sends reaches the CLI as one
/// argument, so shell syntax in a prompt or a caption is just text.
#[test]
fn shell_syntax_in_values_is_just_text() {
    let ui = UiServer::start(&[]);
    let prompt = "-ohwx robot $(touch pwned1); touch pwned2 `touch pwned3` | touch pwned4";
    let r = ui.post(
        "/api/generate",
        &json!({"model": "builtin:tiny", "prompt": prompt, "steps": 1, "width": 64, "height": 64, "seed": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let events = ui.events_until_exit(0, Duration::from_secs(120));
    assert_eq!(events.last().unwrap()["status"], "finished", "{events:#?}");
    let g = ui.get("/api/gallery").json();
    assert_eq!(g["images"][0]["settings"]["prompt"], prompt);
    let r = ui.post(
        "/api/caption",
        &json!({"image": "data/10_ohwx robot/robot_03.png", "text": "$(touch pwned5)"}),
    );
    assert_eq!(r.status, 200);
    let r = ui.get("/api/dataset?path=data%3B%20touch%20pwned6");
    assert_eq!(r.status, 400);
    for n in 1..=6 {
        for dir in [ui.root.clone(), ui.root.join("output/generate")] {
            assert!(
                !dir.join(format!("pwned{n}")).exists(),
                "pwned{n} in {}",
                dir.display()
            );
        }
    }
}
