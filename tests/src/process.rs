//! Processes a test starts and what it needs to run them: free ports, throwaway
//! PostgreSQL databases and servers, Redis servers, a TCP proxy that can cut a link.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A port for a server a test starts. It is taken below the kernel's ephemeral range:
/// a port the kernel hands out (`bind(0)`) can be given again at once to any outgoing
/// connection, and then the server (wrangler, started seconds later) fails to bind
/// it. Below that range only explicit binds compete, and this process counts its own.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    let span = ephemeral_low.saturating_sub(LOW).max(1);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// A fresh, empty PostgreSQL database for one test; returns its URL.
pub async fn fresh_postgres_database() -> String {
    let base = std::env::var("METLO_TEST_PG_URL")
        .expect("METLO_TEST_PG_URL is not set: run the tests with `make test` (scripts/stack.sh starts PostgreSQL)");
    let name = format!("t_{}", unique_suffix());
    let status = Command::new("psql")
        .args([
            base.as_str(),
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .stdout(Stdio::null())
        .status()
        .expect("psql");
    assert!(status.success(), "could not create database {name}");
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// A memory figure of a process from `/proc/<pid>/status`, in KiB: `VmRSS` (resident
/// now), `VmHWM` (the most it was ever resident); `None` when the process is gone.
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory, as the
/// `postgres` user when running as root), so a test can stop and restart it.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bindir: PathBuf,
}

impl Postgres {
    pub fn start() -> Self {
        let pg = Self::init();
        pg.restart();
        pg
    }

    /// A server that takes only TLS: `ssl = on` with this certificate and key (PEM), and
    /// only `hostssl` lines in `pg_hba.conf`, so a plain connection is refused.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        let pg = Self::init();
        let data = pg.dir.path().join("data");
        std::fs::write(data.join("server.crt"), cert_pem).unwrap();
        std::fs::write(data.join("server.key"), key_pem).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let key = data.join("server.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .unwrap();
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&data)
                .status()
                .unwrap();
        }
        pg.restart();
        pg
    }

    fn init() -> Self {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL not installed: run scripts/install-deps.sh")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("no PostgreSQL bin directory");
        let dir = tempfile::tempdir().unwrap();
        let pg = Postgres {
            port: free_port(),
            dir,
            bindir,
        };
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
        }
        let data = pg.dir.path().join("data");
        let out = pg
            .as_pg("initdb")
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn as_pg(&self, tool: &str) -> Command {
        let bin = self.bindir.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL with another host name (for TLS: the name checked against the
    /// certificate) and query (`sslmode=…&sslrootcert=…`).
    pub fn url_with(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }

    /// The server's log (for what it said about a refused connection).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    pub fn restart(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .as_pg("pg_ctl")
            .args(["-w", "-t", "60", "-l"])
            .arg(self.dir.path().join("postgres.log"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server at once (`-m immediate`: connections are cut, as in a crash).
    pub fn stop(&self) {
        let _ = self
            .as_pg("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A throwaway `redis-server` on its own port, stoppable and restartable on that port.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Self {
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run scripts/install-deps.sh");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One command over RESP (no client crate needed); the reply's first line.
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        s.write_all(request.as_bytes()).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// `GET key`: the value, if there is one.
    pub fn get(&self, key: &str) -> Option<String> {
        use std::io::{BufRead, Write};
        let s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        (&s).write_all(format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes())
            .unwrap();
        let mut reader = std::io::BufReader::new(&s);
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let len: i64 = header.trim().trim_start_matches('$').parse().unwrap();
        if len < 0 {
            return None;
        }
        let mut value = vec![0u8; len as usize + 2];
        reader.read_exact(&mut value).unwrap();
        value.truncate(len as usize);
        Some(String::from_utf8(value).unwrap())
    }

    /// Number of keys in Redis (via the RESP protocol, no client crate needed).
    pub fn dbsize(&self) -> i64 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"DBSIZE\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        line.trim().trim_start_matches(':').parse().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy that can cut the network between the control plane and a server: while
/// cut, every connection through it is closed as soon as it carries anything, and what it
/// carried is dropped — a partition in which requests are lost, not merely delayed (a
/// SIGSTOPped server would still execute what was sent once it resumes).
pub struct PartitionProxy {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PartitionProxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut_flag = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if cut_flag.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let cut = cut_flag.clone();
                tokio::spawn(async move {
                    let Ok(outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (client_read, client_write) = inbound.into_split();
                    let (server_read, server_write) = outbound.into_split();
                    // Either direction ending (or the cut) closes both.
                    tokio::select! {
                        _ = forward(client_read, server_write, cut.clone()) => {}
                        _ = forward(server_read, client_write, cut) => {}
                    }
                });
            }
        });
        PartitionProxy { port, cut, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(std::sync::atomic::Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status();
}
