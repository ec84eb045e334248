//! `make dev` (after `scripts/dev.sh` has built everything): starts the whole system and
//! supervises it. A Rust program rather than bash traps, which did not survive a closed
//! stdout pipe or a signal to the process group:
//!
//! - every port it needs is checked free first; a taken one stops it with one line naming
//!   the port and the process holding it;
//! - each child runs in its own process group (so grandchildren such as workerd are
//!   reached) and dies with this process (`PR_SET_PDEATHSIG`);
//! - readiness is our children's: a child that exits during the start fails it with its
//!   last log lines, and since the ports were free, what answers is ours;
//! - SIGINT, SIGTERM, SIGHUP, a closed stdout (`| tee`, `| head`; noticed during the
//!   start too) or a child exiting stops every process group and every descendant, even
//!   one that left its group or lost its parent (this process is their subreaper; SIGTERM,
//!   then SIGKILL after 5 s to what is still there), and exits — non-zero when a child
//!   died or the start failed;
//! - nothing it writes can fail the stop: behind `make dev 2>&1 | tee`, Ctrl-C kills tee
//!   with us, and a write to the closed pipe (`eprintln!` panics on one) must not end
//!   this process before its children;
//! - the KV API stand-in answers before the control plane starts, so the control plane's
//!   first KV sync finds it (a healthy start prints no warning).

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

/// A port the system needs, and the variable that moves it.
struct Port {
    what: &'static str,
    var: &'static str,
    port: u16,
}

fn ports() -> Result<Vec<Port>, String> {
    let defaults = [
        ("control plane", "DEV_CONTROL_PLANE_PORT", 8080),
        ("control plane ops (readyz, metrics)", "DEV_OPS_PORT", 9090),
        ("edge Worker", "DEV_EDGE_PORT", 8787),
        ("KV API stand-in", "DEV_KV_API_PORT", 8788),
        ("demo origin", "DEV_ORIGIN_PORT", 8081),
        ("edge Worker's inspector", "DEV_EDGE_INSPECTOR_PORT", 9229),
        ("KV API stand-in's inspector", "DEV_KV_INSPECTOR_PORT", 9230),
    ];
    defaults
        .into_iter()
        .map(|(what, var, default)| {
            let port = match std::env::var(var) {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("{var}={v:?} is not a port number"))?,
                Err(_) => default,
            };
            Ok(Port { what, var, port })
        })
        .collect()
}

/// Writes to stdout; false once it is closed (a `| head` that has had enough).
fn say(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .is_ok()
}

/// Writes a line to stderr; never panics (stderr may be a pipe whose reader is gone).
fn tell(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}").and_then(|_| err.flush());
}

/// Is stdout a pipe whose reader has gone?
fn stdout_closed() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// The process listening on `port` (pid and command line), from /proc, when it can tell.
fn holder(port: u16) -> Option<String> {
    let mut inodes = vec![];
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{}]", f.get(9)?));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            if inodes.iter().any(|i| Path::new(i) == target) {
                let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmd: Vec<String> = cmd
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                return Some(format!("pid {pid} ({})", cmd.join(" ")));
            }
        }
    }
    None
}

/// The first port that is taken, as the line to print.
fn taken_port(ports: &[Port]) -> Option<String> {
    ports.iter().find_map(|p| {
        std::net::TcpListener::bind(("127.0.0.1", p.port))
            .err()
            .map(|_| {
                let by = holder(p.port).map_or(String::new(), |h| format!(" by {h}"));
                format!(
                    "make dev: port {} ({}) is already in use{by}; stop that process or set {}",
                    p.port, p.what, p.var
                )
            })
    })
}

/// A child in its own process group, stopped with this process if it dies first.
struct Proc {
    name: &'static str,
    child: Child,
    /// Where its output goes (its last lines are shown if it fails).
    log: Log,
}

#[derive(Clone)]
enum Log {
    File(PathBuf),
    /// Kept in memory as it is forwarded to our stdout.
    Lines(Arc<Mutex<VecDeque<String>>>),
}

impl Log {
    fn tail(&self) -> String {
        let lines: Vec<String> = match self {
            Log::File(p) => std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect(),
            Log::Lines(l) => l.lock().unwrap().iter().cloned().collect(),
        };
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

fn spawn(name: &'static str, mut cmd: Command, log: Option<&Path>) -> std::io::Result<Proc> {
    cmd.process_group(0).stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; called between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let log = match log {
        Some(path) => {
            let file = std::fs::File::create(path)?;
            cmd.stdout(file.try_clone()?).stderr(file);
            Log::File(path.to_owned())
        }
        None => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            Log::Lines(Arc::default())
        }
    };
    let mut child = cmd.spawn()?;
    if let Log::Lines(lines) = &log {
        // Forwarded to our stdout (errors ignored: a closed stdout is noticed elsewhere),
        // the last lines kept for a failure message.
        let out = child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>);
        for stream in [out, err].into_iter().flatten() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    say(&format!("{line}\n"));
                    let mut l = lines.lock().unwrap();
                    l.push_back(line);
                    if l.len() > 50 {
                        l.pop_front();
                    }
                }
            });
        }
    }
    Ok(Proc { name, child, log })
}

/// Every descendant of `roots` (pids), from each process's parent in /proc.
fn descendants(roots: &[i32]) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut found: Vec<i32> = roots.to_vec();
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, ppid)| *ppid == p)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.split_off(roots.len())
}

/// Stops everything this process started. It is the subreaper of its descendants (set
/// first thing in `main`), so a process whose parent has exited is re-parented here and
/// the walk from this process still finds it. SIGTERM to each child's process group and
/// to every live descendant; after 5 s, SIGKILL to the descendants still there, found
/// afresh (no pid kept across the wait is signalled: it could have been reused).
fn stop_all(procs: &mut [Proc]) {
    let me = std::process::id() as i32;
    let live = || {
        descendants(&[me])
            .into_iter()
            .filter(|pid| !is_zombie(*pid))
            .collect::<Vec<i32>>()
    };
    for p in procs.iter() {
        // SAFETY: plain kill(2) of the child's process group (its pid is not yet reaped).
        unsafe { libc::kill(-(p.child.id() as i32), libc::SIGTERM) };
    }
    for pid in live() {
        // SAFETY: plain kill(2) of a process just found under this one.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for p in procs.iter_mut() {
            let _ = p.child.try_wait();
        }
        reap_orphans();
        if live().is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in live() {
        // SAFETY: as above, found just now.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for p in procs.iter_mut() {
        let _ = p.child.wait();
    }
    reap_orphans();
}

/// Writes `text` to `path`, readable and writable by its owner only (it holds a key),
/// whatever mode an older copy had.
fn write_private(path: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())
}

/// Reaps the exited processes re-parented here (this process is their subreaper).
fn reap_orphans() {
    // SAFETY: waitpid(2) without blocking; a null status pointer is allowed.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The first child that has exited, and how.
fn exited(procs: &mut [Proc]) -> Option<(usize, String)> {
    procs.iter_mut().enumerate().find_map(|(i, p)| {
        p.child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| (i, s.to_string()))
    })
}

fn fail(procs: &mut [Proc], message: &str) -> ExitCode {
    tell(&format!("make dev: {message}"));
    stop_all(procs);
    ExitCode::FAILURE
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Orphans of our children (wrangler's node and workerd when `npm exec` dies first) are
    // re-parented here instead of to init, so `stop_all` still finds them.
    // SAFETY: prctl(2) on this process only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let ports = match ports() {
        Ok(p) => p,
        Err(e) => {
            tell(&format!("make dev: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if let Some(line) = taken_port(&ports) {
        tell(&line);
        return ExitCode::FAILURE;
    }
    // The signals first, so that none arriving during the start is missed.
    let (mut int, mut term, mut hup) = (
        signal(SignalKind::interrupt()).unwrap(),
        signal(SignalKind::terminate()).unwrap(),
        signal(SignalKind::hangup()).unwrap(),
    );
    let port = |var: &str| ports.iter().find(|p| p.var == var).unwrap().port;
    let (cp, ops, edge, kv, origin) = (
        port("DEV_CONTROL_PLANE_PORT"),
        port("DEV_OPS_PORT"),
        port("DEV_EDGE_PORT"),
        port("DEV_KV_API_PORT"),
        port("DEV_ORIGIN_PORT"),
    );
    let root = std::env::current_dir().unwrap();
    let bin = root.join("target/debug/metlo-control-plane");
    let state = std::env::var("DEV_STATE_DIR").unwrap_or_else(|_| ".wrangler/state".into());
    let env: Vec<(&str, String)> = vec![
        ("LISTEN_ADDR", format!("127.0.0.1:{cp}")),
        ("OPS_LISTEN_ADDR", format!("127.0.0.1:{ops}")),
        ("KV_API_URL", format!("http://127.0.0.1:{kv}/client/v4")),
        ("CLOUDFLARE_ACCOUNT_ID", "local".into()),
        ("KV_NAMESPACE_ID", "metlo-keys-local".into()),
        ("CLOUDFLARE_API_TOKEN", "dev-token".into()),
        ("CI", "true".into()),
        ("WRANGLER_SEND_METRICS", "false".into()),
        ("CLOUDFLARE_CF_FETCH_ENABLED", "false".into()),
    ];

    // Keys are shown once: fresh ones each run (the old ones are deleted first).
    let fresh_key = |name: &str, role: &str| -> Result<String, String> {
        let _ = Command::new(&bin)
            .args(["keys", "delete", name])
            .envs(env.clone())
            .output();
        let out = Command::new(&bin)
            .args(["keys", "create", "--name", name, "--role", role])
            .envs(env.clone())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "making the {name} key failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let keys = (|| {
        Ok::<_, String>((
            fresh_key("dev-admin", "admin")?,
            fresh_key("dev-edge-worker", "edge")?,
            fresh_key("dev-demo", "client")?,
        ))
    })();
    let (admin_key, worker_key, demo_key) = match keys {
        Ok(k) => k,
        Err(e) => return fail(&mut [], &e),
    };
    // Git-ignored; wrangler reads the Worker's secret from it. Its owner's only.
    if let Err(e) = write_private(
        ".dev.vars",
        &format!("CONTROL_PLANE_KEY = \"{worker_key}\"\n"),
    ) {
        return fail(&mut [], &format!("cannot write .dev.vars: {e}"));
    }

    let npx_wrangler = |config: Option<&str>, port: u16, inspector: u16, vars: &[String]| {
        let mut c = Command::new("npx");
        c.arg("wrangler").arg("dev");
        if let Some(cfg) = config {
            c.args(["-c", cfg]);
        }
        c.args(["--local", "--ip", "127.0.0.1", "--port", &port.to_string()])
            .args(["--inspector-port", &inspector.to_string()])
            .args([
                "--persist-to",
                &state,
                "--show-interactive-dev-session=false",
            ]);
        for v in vars {
            c.args(["--var", v]);
        }
        c.envs(env.clone());
        c
    };
    let mut procs: Vec<Proc> = vec![];
    let mut origin_cmd = Command::new(root.join("target/debug/demo-origin"));
    origin_cmd.arg(origin.to_string());
    // In two waves: the control plane's KV sync starts at once, so the KV stand-in must
    // answer first (else its first pushes fail and warn). The Worker, which asks the
    // control plane only when a request comes, starts beside it.
    let waves = [
        vec![
            (
                "demo origin",
                origin_cmd,
                Some(PathBuf::from(".dev-origin.log")),
                format!("http://127.0.0.1:{origin}/"),
            ),
            (
                "KV API stand-in",
                npx_wrangler(
                    Some("dev/kv-api/wrangler.toml"),
                    kv,
                    port("DEV_KV_INSPECTOR_PORT"),
                    // KV's propagation in production, reproduced (`KV_PROPAGATION_DELAY_MS`).
                    &[format!(
                        "PROPAGATION_DELAY_MS:{}",
                        std::env::var("KV_PROPAGATION_DELAY_MS").unwrap_or_else(|_| "0".into())
                    )],
                ),
                Some(PathBuf::from(".wrangler-kv-api.log")),
                format!("http://127.0.0.1:{kv}/__stats"),
            ),
        ],
        vec![
            (
                "control plane",
                {
                    let mut c = Command::new(&bin);
                    c.arg("serve").envs(env.clone());
                    c
                },
                None,
                format!("http://127.0.0.1:{cp}/healthz"),
            ),
            (
                "edge Worker",
                npx_wrangler(
                    None,
                    edge,
                    port("DEV_EDGE_INSPECTOR_PORT"),
                    &[
                        format!("CONTROL_PLANE_URL:http://127.0.0.1:{cp}"),
                        format!("ORIGIN_URL:http://127.0.0.1:{origin}"),
                    ],
                ),
                Some(PathBuf::from(".wrangler-edge.log")),
                format!("http://127.0.0.1:{edge}/"),
            ),
        ],
    ];

    // Ready when each of our children answers; one that exits first fails the start.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    for wave in waves {
        let mut checks = vec![];
        for (name, cmd, log, url) in wave {
            match spawn(name, cmd, log.as_deref()) {
                Ok(p) => procs.push(p),
                Err(e) => return fail(&mut procs, &format!("cannot start the {name}: {e}")),
            }
            checks.push((name, url));
        }
        for (name, url) in &checks {
            loop {
                if let Some((i, status)) = exited(&mut procs) {
                    let p = &procs[i];
                    let msg = format!(
                        "the {} exited during the start ({status}); its last lines:\n{}",
                        p.name,
                        p.log.tail()
                    );
                    return fail(&mut procs, &msg);
                }
                // Whoever reads our output has gone (`| head`): nobody would see the banner.
                if stdout_closed() {
                    stop_all(&mut procs);
                    return ExitCode::SUCCESS;
                }
                tokio::select! {
                    _ = int.recv() => return { stop_all(&mut procs); ExitCode::SUCCESS },
                    _ = term.recv() => return { stop_all(&mut procs); ExitCode::SUCCESS },
                    _ = hup.recv() => return { stop_all(&mut procs); ExitCode::SUCCESS },
                    r = http.get(url).send() => if r.is_ok() { break },
                }
                if Instant::now() > deadline {
                    return fail(
                        &mut procs,
                        &format!("the {name} did not answer at {url} within 120 s"),
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // The keys made above reach KV through the outbox.
    for _ in 0..100 {
        if stdout_closed() {
            break;
        }
        let ready = http
            .get(format!("http://127.0.0.1:{ops}/readyz"))
            .send()
            .await;
        if let Ok(r) = ready {
            if r.text()
                .await
                .unwrap_or_default()
                .contains("\"outboxDepth\":0")
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let banner = format!(
        "
  Everything is up (logs: control plane below, the others in .wrangler-*.log, .dev-origin.log).

  Keys (each shown once):
    admin   (manages keys, reads the audit log; refused at the edge): {admin_key}
    client  (demo traffic through the edge, /api/v1/verify):          {demo_key}
    edge    (the Worker's own key, in .dev.vars; refused at the edge): dev-edge-worker

  Through the edge (the Worker checks the key, then proxies to the demo origin):
    curl -s -H 'Authorization: {demo_key}' http://127.0.0.1:{edge}/hello?x=1
    curl -s -i http://127.0.0.1:{edge}/hello                                  # 401

  The admin console (sign in with the admin key above):
    http://127.0.0.1:{cp}/console

  The control plane's API (admin key; the demo key gets 403 here):
    curl -s -H 'Authorization: {admin_key}' http://127.0.0.1:{cp}/api/v1/keys/list
    curl -s http://127.0.0.1:{ops}/readyz                                     # ops port
    curl -s -H 'Authorization: {admin_key}' -X DELETE http://127.0.0.1:{cp}/api/v1/keys/dev-demo/delete
      (then the edge refuses the demo key within a second)

  Ctrl-C stops everything.

"
    );
    if !say(&banner) {
        stop_all(&mut procs);
        return ExitCode::SUCCESS;
    }

    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => break,
            _ = tick.tick() => {
                if let Some((i, status)) = exited(&mut procs) {
                    let p = &procs[i];
                    let msg = format!("the {} exited ({status}); stopping the rest. Its last lines:\n{}", p.name, p.log.tail());
                    return fail(&mut procs, &msg);
                }
                if stdout_closed() {
                    break;
                }
            }
        }
    }
    tell("stopping…");
    stop_all(&mut procs);
    ExitCode::SUCCESS
}
