//! Real headless Chromium (Debian's, installed by `scripts/install-deps.sh`) driven through
//! ChromeDriver with `fantoccini`, for the console's tests: pages, screenshots at a
//! desktop and a phone width, and axe-core's accessibility check injected into the page.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::{free_port, wait_for_port, workspace_root};

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// Where the tests save their screenshots (git-ignored: under `target/`).
pub fn screenshot_dir() -> PathBuf {
    workspace_root().join("target/console-screenshots")
}

impl Browser {
    pub async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: stopping it stops the Chromium it started.
            .process_group(0)
            .spawn()
            .expect("chromedriver: run scripts/install-deps.sh (Debian chromium-driver)");
        wait_for_port(port, Duration::from_secs(20));
        let profile = tempfile::tempdir().unwrap();
        // The flags keep Chromium off the network it cannot reach here (and quiet).
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let caps = caps.as_object().unwrap().clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a ChromeDriver session");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Waits (up to 10 s) for an element matching `css`.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css:?} on the page: {e}"))
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap()
    }

    /// Waits (up to `within`) until `script` returns true.
    pub async fn until(&self, what: &str, script: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.js(script, vec![]).await == Value::Bool(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the first element matching `css` ("" when none).
    pub async fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            vec![json!(css)],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// axe-core's findings of impact serious or critical on the page as it is now.
    pub async fn axe_violations(&self) -> Vec<Value> {
        let axe =
            std::fs::read_to_string(workspace_root().join("node_modules/axe-core/axe.min.js"))
                .expect("axe-core: run scripts/install-edge-tools.sh (npm ci)");
        // WebDriver's script runs outside the page's CSP, so axe needs no inline-script
        // allowance in the console's policy.
        let script = format!(
            "{axe}\nconst done = arguments[arguments.length - 1];\n\
             axe.run(document, {{resultTypes: ['violations']}}).then(r => done(r.violations.filter(\
             v => v.impact === 'serious' || v.impact === 'critical').map(v => ({{id: v.id, impact: v.impact, \
             help: v.help, nodes: v.nodes.map(n => n.target.join(' '))}})))).catch(e => done([{{error: String(e)}}]));"
        );
        let found = self.client.execute_async(&script, vec![]).await.unwrap();
        found.as_array().cloned().unwrap_or_default()
    }

    /// Checks the page with axe-core (no serious or critical violation) and saves it at
    /// 1280 px and 360 px wide as `<name>-1280.png` and `<name>-360.png`; at 360 px the
    /// page itself must not scroll sideways. Back at 1280 px after.
    pub async fn check_page(&self, name: &str) {
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        for width in [1280u32, 360] {
            self.client.set_window_size(width, 900).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let violations = self.axe_violations().await;
            assert!(
                violations.is_empty(),
                "{name} at {width} px: accessibility violations: {}",
                serde_json::to_string_pretty(&violations).unwrap()
            );
            if width == 360 {
                let wide = self
                    .js("return document.documentElement.scrollWidth;", vec![])
                    .await;
                assert!(
                    wide.as_u64().unwrap() <= 360,
                    "{name} scrolls sideways at 360 px ({wide} px wide)"
                );
            }
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{name}-{width}.png")), png).unwrap();
        }
        self.client.set_window_size(1280, 900).await.unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
