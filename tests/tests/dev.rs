//! `make dev` as a user runs it: start, wait for the printed curl, run it, stop it — with
//! Ctrl-C typed in a real terminal (tmux, with an interactive bash: the line discipline
//! sends SIGINT to the foreground job, `make` and its children and `tee` alike), with and
//! without `2>&1 | tee`, SIGTERM to the process group of `make dev | cat`, SIGHUP, `| head`,
//! or a child dying — and check that no process it started is left and every port is free
//! within 10 s; a healthy start prints no warning; and a start with a port already taken
//! fails with one clear line, starting nothing. (On free ports of its own, with its own
//! data and KV state.)

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metlo_tests::{free_port, unique_suffix, workspace_root};

const PORT_VARS: [&str; 7] = [
    "DEV_CONTROL_PLANE_PORT",
    "DEV_OPS_PORT",
    "DEV_EDGE_PORT",
    "DEV_KV_API_PORT",
    "DEV_ORIGIN_PORT",
    "DEV_EDGE_INSPECTOR_PORT",
    "DEV_KV_INSPECTOR_PORT",
];

struct Setup {
    ports: Vec<(&'static str, u16)>,
    env: Vec<(String, String)>,
    /// In every process's environment: how what a run left behind is found.
    mark: String,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(&str, u16)> = PORT_VARS.iter().map(|v| (*v, free_port())).collect();
        let mark = format!("dev-test-{}", unique_suffix());
        let mut env: Vec<(String, String)> = ports
            .iter()
            .map(|(k, p)| (k.to_string(), p.to_string()))
            .collect();
        env.push((
            "DEV_STATE_DIR".into(),
            dir.path().join("state").display().to_string(),
        ));
        env.push((
            "DATA_DIR".into(),
            dir.path().join("data").display().to_string(),
        ));
        env.push(("METLO_DEV_TEST_MARK".into(), mark.clone()));
        Setup {
            ports,
            env,
            mark,
            _dir: dir,
        }
    }

    fn port(&self, var: &str) -> u16 {
        self.ports.iter().find(|(k, _)| *k == var).unwrap().1
    }

    /// `command` typed at an interactive bash in a real terminal: a tmux session of the
    /// test's own (its own server socket), as a user runs `make dev` — bash runs it as
    /// the terminal's foreground job, so Ctrl-C reaches make, the supervisor and `tee`.
    fn open_terminal(&self, command: &str) -> Terminal {
        static TERMINALS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = TERMINALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = format!("{}-tmux-{n}", self.mark);
        let screen = self._dir.path().join(format!("{socket}.screen"));
        let tmux = |args: &[&str]| {
            let status = Command::new("tmux")
                .arg("-L")
                .arg(&socket)
                .args(args)
                .current_dir(workspace_root())
                // The terminal itself does not carry the mark: only the typed command does.
                .envs(
                    self.env
                        .iter()
                        .filter(|(k, _)| k != "METLO_DEV_TEST_MARK")
                        .cloned(),
                )
                .env("PS1", "$ ")
                .stdin(Stdio::null())
                .status()
                .expect("tmux (scripts/install-deps.sh installs it)");
            assert!(status.success(), "tmux {args:?}");
        };
        tmux(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "dev",
            "-x",
            "200",
            "-y",
            "50",
            "bash --norc --noprofile -i",
        ]);
        tmux(&[
            "pipe-pane",
            "-t",
            "dev",
            "-o",
            &format!("cat >> {}", screen.display()),
        ]);
        let typed = format!("METLO_DEV_TEST_MARK={} {command}", self.mark);
        tmux(&["send-keys", "-t", "dev", "-l", &typed]);
        tmux(&["send-keys", "-t", "dev", "Enter"]);
        Terminal { socket, screen }
    }

    /// `shell` run by bash in the repository, in its own process group (as a terminal
    /// runs a command), stdout piped to the test.
    fn spawn(&self, shell: &str) -> Child {
        Command::new("bash")
            .args(["-c", shell])
            .current_dir(workspace_root())
            .envs(self.env.iter().cloned())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Processes (not yet reaped) that carry this setup's mark.
    fn leftovers(&self) -> Vec<String> {
        let needle = format!("METLO_DEV_TEST_MARK={}", self.mark);
        let mut found = vec![];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
                let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                found.push(format!(
                    "{pid}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                ));
            }
        }
        found
    }

    /// Within 10 s: nothing of the run left, every port free.
    fn assert_cleaned_up(&self, how: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.leftovers();
            let busy: Vec<u16> = self
                .ports
                .iter()
                .map(|(_, p)| *p)
                .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_err())
                .collect();
            if left.is_empty() && busy.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{how}: left running {left:#?}, ports still taken {busy:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Setup {
    /// A failed test leaves nothing running: whatever carries the mark is killed.
    fn drop(&mut self) {
        for process in self.leftovers() {
            if let Some(pid) = process
                .split(':')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) of a process this test started (it carries the mark).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Reads the run's stdout until the printed curl through the edge; returns the demo key.
fn wait_for_banner(child: &mut Child) -> (String, BufReader<std::process::ChildStdout>) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "make dev ended before printing its curl"
        );
        if let Some(rest) = line.trim().strip_prefix("curl -s -H 'Authorization: ") {
            let key = rest.split('\'').next().unwrap().to_owned();
            return (key, out);
        }
        assert!(Instant::now() < deadline, "no curl printed");
    }
}

/// A tmux session of the test's own; killed (with its server) on drop.
struct Terminal {
    socket: String,
    /// Everything the terminal showed (`pipe-pane`).
    screen: std::path::PathBuf,
}

impl Terminal {
    fn keys(&self, keys: &str) {
        let status = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", "dev", keys])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Types Ctrl-C.
    fn ctrl_c(&self) {
        self.keys("C-c");
    }

    /// Waits until the terminal shows the printed curl through the edge; returns the
    /// demo key and everything shown before it.
    fn wait_for_banner(&self) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let shown = std::fs::read_to_string(&self.screen).unwrap_or_default();
            let curl = shown.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("curl -s -H 'Authorization: ")
                    .map(|rest| rest.split('\'').next().unwrap().to_owned())
            });
            if let Some(key) = curl {
                let before = shown[..shown.find("curl -s -H").unwrap()].to_owned();
                return (key, before);
            }
            assert!(Instant::now() < deadline, "no curl printed:\n{shown}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// The printed curl works: the demo key through the edge reaches the origin.
fn curl_through_edge(setup: &Setup, key: &str) {
    let url = format!("http://127.0.0.1:{}/hello?x=1", setup.port("DEV_EDGE_PORT"));
    let status = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: {key}"),
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "200",
        "curl: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

fn signal_group(child: &Child, signal: i32) {
    // SAFETY: kill(2) of the group the test made for this run.
    unsafe { libc::kill(-(child.id() as i32), signal) };
}

/// Waits for the run to end; its exit code. (Stopping takes seconds; the allowance is for
/// a loaded machine.)
fn finish(mut child: Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "make dev did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn make_dev_starts_what_it_says_and_always_cleans_up() {
    // `make dev` in a terminal, then Ctrl-C: the line discipline sends SIGINT to the whole
    // foreground job. The first run builds what is missing; a healthy start warns of
    // nothing (the KV stand-in answers before the control plane's KV sync starts).
    let setup = Setup::new();
    let terminal = setup.open_terminal("make dev");
    let (key, before) = terminal.wait_for_banner();
    assert!(
        !before.contains("WARN") && !before.contains("KV sync failed"),
        "a healthy start printed a warning:\n{before}"
    );
    curl_through_edge(&setup, &key);
    let vars = metlo_tests::workspace_root().join(".dev.vars");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&vars).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o600,
        ".dev.vars holds the Worker's key: its owner's only"
    );
    terminal.ctrl_c();
    setup.assert_cleaned_up("make dev in a terminal, then Ctrl-C");
    drop(terminal);

    // The same behind `2>&1 | tee`: tee dies at once with the rest of the job, so every
    // line the supervisor writes while stopping goes to a closed pipe.
    let log = setup._dir.path().join("dev.log");
    let terminal = setup.open_terminal(&format!("make dev 2>&1 | tee {}", log.display()));
    let (key, _) = terminal.wait_for_banner();
    curl_through_edge(&setup, &key);
    terminal.ctrl_c();
    setup.assert_cleaned_up("make dev 2>&1 | tee, then Ctrl-C in the terminal");
    drop(terminal);

    // SIGTERM to the process group of `make dev | cat` (make passes SIGTERM on to its
    // child as well; cat dies with the group).
    let mut run = setup.spawn("make dev | cat");
    let (key, _out) = wait_for_banner(&mut run);
    curl_through_edge(&setup, &key);
    signal_group(&run, libc::SIGTERM);
    finish(run);
    setup.assert_cleaned_up("SIGTERM to the group of make dev | cat");

    // The program the script ends in, for the other ways (the build is done).
    let mut run = setup.spawn("exec target/debug/dev");
    let (key, _out) = wait_for_banner(&mut run);
    curl_through_edge(&setup, &key);
    signal_group(&run, libc::SIGHUP);
    finish(run);
    setup.assert_cleaned_up("SIGHUP");

    // `| head -n 1`: the reader goes after one line, during the start — which stops there,
    // not when it comes to print the banner.
    let run = setup.spawn("target/debug/dev | head -n 1");
    let started = Instant::now();
    finish(run);
    println!(
        "| head -n 1: ended {} ms after it started",
        started.elapsed().as_millis()
    );
    setup.assert_cleaned_up("| head -n 1");

    // A child dies: the rest is stopped, and the run fails.
    let mut run = setup.spawn("exec target/debug/dev");
    let (_, _out) = wait_for_banner(&mut run);
    let control_plane = setup
        .leftovers()
        .into_iter()
        .find(|p| p.contains("metlo-control-plane serve"))
        .expect("the control plane is running");
    let pid: i32 = control_plane.split(':').next().unwrap().parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut stderr = String::new();
    let mut err = run.stderr.take().unwrap();
    let code = finish(run);
    std::io::Read::read_to_string(&mut err, &mut stderr).unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the control plane exited"), "{stderr}");
    setup.assert_cleaned_up("a child dying");

    // A port already taken: one clear line naming it and its holder, nothing started.
    let edge_port = setup.port("DEV_EDGE_PORT");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", edge_port)).unwrap();
    let mut run = setup.spawn("exec target/debug/dev");
    let mut err = run.stderr.take().unwrap();
    let code = finish(run);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut err, &mut stderr).unwrap();
    assert_eq!(code, Some(1));
    let expected = format!(
        "make dev: port {edge_port} (edge Worker) is already in use by pid {}",
        std::process::id()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert!(stderr.contains("set DEV_EDGE_PORT"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    drop(squatter);
    setup.assert_cleaned_up("a port taken");
}
