//! The web app in a real browser: headless Chromium (Debian's `chromium`
//! package) driven over the DevTools protocol. Opens the app, loads the
//! example dataset, starts a short run on `builtin:tiny` from the form,
//! reloads the page while it runs (the page must reattach), waits for the
//! progress to reach the end with a loss chart and a preview image on the
//! page, inspects the trained file, then generates an image with it. Writes screenshots
//! (`SD_LORA_UI_SCREENSHOT_DIR`, default the test's scratch folder); the
//! README's is `docs/images/ui-train.png`.
//!
//! Chromium must be installed (`apt-get install chromium`; `.ci/run` does
//! it). Without it the test fails saying so, unless
//! `SD_LORA_SKIP_BROWSER_TESTS=1` is set (CI never sets it).

mod ui_support;

use chromiumoxide::Page;
use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::ScreenshotParams;
use futures_util::StreamExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use ui_support::UiServer;

/// The Chromium binary: `SD_LORA_CHROMIUM`, else the usual names on PATH.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SD_LORA_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Evaluates `js` (an expression) in the page.
async fn eval(page: &Page, js: &str) -> serde_json::Value {
    match page.evaluate(js).await {
        Ok(r) => r.value().cloned().unwrap_or(serde_json::Value::Null),
        Err(e) => panic!("evaluating {js}: {e}"),
    }
}

/// Waits until `js` is truthy; on timeout fails with `what`, the page's
/// visible errors and the job log.
async fn wait_for(page: &Page, js: &str, what: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        let v = eval(
            page,
            &format!("(() => {{ try {{ return !!({js}); }} catch (e) {{ return false; }} }})()"),
        )
        .await;
        if v == serde_json::Value::Bool(true) {
            return;
        }
        if started.elapsed() > timeout {
            let errors = eval(page, "Array.from(document.querySelectorAll('.error, .field-error')).map(e => e.textContent).filter(t => t.trim()).join(' | ')").await;
            let log = eval(
                page,
                "(document.querySelector('#log') || {}).textContent || ''",
            )
            .await;
            panic!("timed out waiting for {what} ({js}); errors on the page: {errors}; log: {log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sets an input's value as a user typing would (input and change events).
async fn set_value(page: &Page, selector: &str, value: &str) {
    let js = format!(
        "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.focus(); e.value = {val}; \
         e.dispatchEvent(new Event('input', {{bubbles: true}})); e.dispatchEvent(new Event('change', {{bubbles: true}})); e.blur(); return true; }})()",
        sel = serde_json::to_string(selector).unwrap(),
        val = serde_json::to_string(value).unwrap()
    );
    assert_eq!(
        eval(page, &js).await,
        serde_json::Value::Bool(true),
        "no element {selector}"
    );
}

async fn click(page: &Page, selector: &str) {
    page.find_element(selector)
        .await
        .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("cannot click {selector}: {e}"));
}

async fn screenshot(page: &Page, name: &str, dir: &std::path::Path) {
    let png = page
        .screenshot(ScreenshotParams::builder().full_page(false).build())
        .await
        .expect("screenshot");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artist_trains_and_generates_in_the_browser() {
    let Some(chromium) = find_chromium() else {
        if std::env::var_os("SD_LORA_SKIP_BROWSER_TESTS").is_some_and(|v| v == "1") {
            eprintln!("SD_LORA_SKIP_BROWSER_TESTS=1: the browser test is skipped");
            return;
        }
        panic!(
            "Chromium was not found: install it (Debian/Ubuntu: `sudo apt-get install chromium`), \
             or point SD_LORA_CHROMIUM at a Chrome/Chromium binary; \
             SD_LORA_SKIP_BROWSER_TESTS=1 skips this test"
        );
    };
    let ui = UiServer::start(&[]);
    // A relative folder is taken from the repository root (tests run in crates/cli).
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shots = std::env::var_os("SD_LORA_UI_SCREENSHOT_DIR")
        .map(|d| repo.join(d))
        .unwrap_or_else(|| ui.root.join("screenshots"));
    let profile = tempfile::tempdir().unwrap();
    let config = BrowserConfig::builder()
        .chrome_executable(&chromium)
        .no_sandbox()
        .new_headless_mode()
        .window_size(1280, 900)
        .viewport(Viewport {
            width: 1280,
            height: 900,
            ..Viewport::default()
        })
        .user_data_dir(profile.path())
        .arg("--disable-gpu")
        .arg("--disable-dev-shm-usage")
        .launch_timeout(Duration::from_secs(60))
        .request_timeout(Duration::from_secs(60))
        .build()
        .expect("browser config");
    let (mut browser, mut handler) = Browser::launch(config)
        .await
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
    let events = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let page = browser
        .new_page(ui.url.as_str())
        .await
        .expect("open the app");
    wait_for(
        &page,
        "document.querySelector('button.tab[data-view=dataset]')",
        "the app to load",
        Duration::from_secs(30),
    )
    .await;

    // Dataset view: load the example dataset, see its eight images.
    click(&page, "button.tab[data-view=dataset]").await;
    // Choose the folder with the server-side picker: open `data`, press Choose.
    set_value(&page, "#ds-path", "").await;
    click(&page, "#ds-browse").await;
    wait_for(
        &page,
        "document.querySelector('#picker').open && document.querySelector('.picker-entry[data-path$=\"/data\"]')",
        "the picker with the project folder",
        Duration::from_secs(10),
    )
    .await;
    click(&page, ".picker-entry[data-path$=\"/data\"]").await;
    wait_for(
        &page,
        "document.querySelector('.picker-entry[data-path$=\"/10_ohwx robot\"]')",
        "the picker inside data/",
        Duration::from_secs(10),
    )
    .await;
    click(&page, "#picker-choose").await;
    wait_for(
        &page,
        "!document.querySelector('#picker').open && document.querySelector('#ds-path').value.endsWith('/data')",
        "the chosen folder in the field",
        Duration::from_secs(10),
    )
    .await;
    click(&page, "#ds-load").await;
    wait_for(
        &page,
        "document.querySelectorAll('#ds-grid .thumb').length === 8",
        "eight thumbnails",
        Duration::from_secs(60),
    )
    .await;
    wait_for(&page, "Array.from(document.querySelectorAll('#ds-grid .thumb img')).every(i => i.complete && i.naturalWidth > 0)", "thumbnails to load", Duration::from_secs(60)).await;
    let captions = eval(
        &page,
        "Array.from(document.querySelectorAll('#ds-grid textarea.caption')).map(t => t.value)",
    )
    .await;
    assert!(captions.to_string().contains("ohwx robot"), "{captions}");
    screenshot(&page, "ui-dataset.png", &shots).await;

    // Train view: the quickstart preset on this dataset, shortened.
    click(&page, "#ds-use").await;
    wait_for(&page, "!document.querySelector('#view-train').hidden && document.querySelector('#view-train').offsetParent !== null", "the train view", Duration::from_secs(10)).await;
    wait_for(
        &page,
        "document.querySelector('#preset option[value=quickstart]')",
        "presets",
        Duration::from_secs(10),
    )
    .await;
    set_value(&page, "#preset", "quickstart").await;
    click(&page, "#preset-apply").await;
    wait_for(
        &page,
        "document.querySelector('input[data-key=\"train.steps\"]').value === '200'",
        "the preset in the form",
        Duration::from_secs(10),
    )
    .await;
    set_value(&page, "input[data-key=\"train.steps\"]", "12").await;
    set_value(&page, "input[data-key=\"output.sample_every\"]", "12").await;
    set_value(&page, "input[data-key=\"output.save_every\"]", "0").await;
    wait_for(
        &page,
        "/MiB|GiB/.test(document.querySelector('#estimate').textContent)",
        "the memory estimate",
        Duration::from_secs(60),
    )
    .await;
    // A bad value gets the CLI's message next to its field.
    set_value(&page, "input[data-key=\"network.rank\"]", "0").await;
    wait_for(&page, "/at least 1/.test(document.querySelector('.field[data-key=\"network.rank\"] .field-error').textContent)", "the rank error next to its field", Duration::from_secs(60)).await;
    set_value(&page, "input[data-key=\"network.rank\"]", "4").await;
    wait_for(&page, "document.querySelector('.field[data-key=\"network.rank\"] .field-error').textContent.trim() === ''", "the rank error to clear", Duration::from_secs(60)).await;
    wait_for(
        &page,
        "/train\\.steps=12\\b/.test(document.querySelector('#command').textContent)",
        "the command line with the steps set",
        Duration::from_secs(30),
    )
    .await;
    click(&page, "#train-start").await;
    wait_for(
        &page,
        "/running|finished/.test(document.querySelector('#job-status').textContent)",
        "the run to start",
        Duration::from_secs(60),
    )
    .await;

    // Reload while it runs: the page reattaches to the job.
    page.reload().await.expect("reload");
    wait_for(
        &page,
        "document.querySelector('#job-status')",
        "the app after reload",
        Duration::from_secs(30),
    )
    .await;
    click(&page, "button.tab[data-view=train]").await;
    wait_for(
        &page,
        "/finished/.test(document.querySelector('#job-status').textContent)",
        "the run to finish",
        Duration::from_secs(300),
    )
    .await;
    let step = eval(
        &page,
        "document.querySelector('#progress-step').textContent",
    )
    .await;
    assert!(step.as_str().unwrap().contains("12/12"), "{step}");
    wait_for(
        &page,
        "Number(document.querySelector('#loss-chart').dataset.points) >= 12",
        "a loss chart of every step",
        Duration::from_secs(10),
    )
    .await;
    wait_for(&page, "Array.from(document.querySelectorAll('#previews img')).some(i => i.complete && i.naturalWidth > 0)", "a preview image", Duration::from_secs(30)).await;
    screenshot(&page, "ui-train.png", &shots).await;

    // The LoRA files view: the trained file inspected from the train panel.
    click(&page, "#train-inspect-lora").await;
    wait_for(
        &page,
        "/kohya/.test(document.querySelector('#lora-info').textContent) && /72/.test(document.querySelector('#lora-info').textContent)",
        "the trained LoRA's format and module count",
        Duration::from_secs(30),
    )
    .await;
    screenshot(&page, "ui-lora.png", &shots).await;

    // Generate view: an image with the trained LoRA.
    click(&page, "button.tab[data-view=generate]").await;
    click(&page, "#gen-use-trained").await;
    wait_for(&page, "Array.from(document.querySelectorAll('#gen-loras input.lora-path')).some(i => i.value.endsWith('.safetensors'))", "the trained LoRA in the form", Duration::from_secs(10)).await;
    set_value(&page, "#gen-model", "builtin:tiny").await;
    set_value(&page, "#gen-prompt", "ohwx robot on a beach").await;
    set_value(&page, "#gen-steps", "3").await;
    set_value(&page, "#gen-width", "64").await;
    set_value(&page, "#gen-height", "64").await;
    set_value(&page, "#gen-seed", "5").await;
    click(&page, "#gen-run").await;
    wait_for(&page, "Array.from(document.querySelectorAll('#gallery .gallery-item img')).some(i => i.complete && i.naturalWidth > 0)", "a generated image in the gallery", Duration::from_secs(180)).await;
    let params = eval(
        &page,
        "document.querySelector('#gallery .gallery-item .params').textContent",
    )
    .await;
    assert!(
        params.as_str().unwrap().contains("ohwx robot on a beach"),
        "{params}"
    );
    assert!(params.as_str().unwrap().contains("Seed: 5"), "{params}");
    screenshot(&page, "ui-generate.png", &shots).await;

    let _ = browser.close().await;
    let _ = browser.wait().await;
    events.abort();
}
