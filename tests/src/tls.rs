//! TLS for the tests: certificate authorities and server certificates made at run time
//! (rcgen), and a Redis that takes only TLS and passwords (PostgreSQL's is
//! [`crate::Postgres::start_tls`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::process::{free_port, wait_for_port};

/// A certificate authority of the test's own.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM: what a client is told to trust.
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A server certificate for `names` (host names or IP addresses): certificate and
    /// key, PEM.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "test server");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA's certificate into `dir`; returns its path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

/// A `redis-server` with only a TLS port (`--port 0`), a password for the default user
/// (`admin_password`, for the test's own commands) and whatever ACL users `acl` adds.
pub struct TlsRedis {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    admin_password: String,
}

impl TlsRedis {
    pub fn start(ca: &Ca, names: &[&str], admin_password: &str, acl: &[&str]) -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.issue(names);
        std::fs::write(dir.path().join("redis.crt"), cert).unwrap();
        std::fs::write(dir.path().join("redis.key"), key).unwrap();
        ca.write(dir.path(), "ca.crt");
        let port = free_port();
        let mut conf = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n\
             tls-cert-file redis.crt\ntls-key-file redis.key\ntls-ca-cert-file ca.crt\n\
             tls-auth-clients no\nrequirepass {admin_password}\n"
        );
        for user in acl {
            conf.push_str(&format!("user {user}\n"));
        }
        std::fs::write(dir.path().join("redis.conf"), conf).unwrap();
        let child = Command::new("redis-server")
            .arg("redis.conf")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run scripts/install-deps.sh");
        wait_for_port(port, Duration::from_secs(10));
        TlsRedis {
            port,
            child,
            dir,
            admin_password: admin_password.to_owned(),
        }
    }

    /// `rediss://user:password@host:port/`.
    pub fn url(&self, host: &str, user: &str, password: &str) -> String {
        format!("rediss://{user}:{password}@{host}:{}/", self.port)
    }

    /// A command as the default user, through `redis-cli --tls`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", "ca.crt", "-h", "localhost", "-p"])
            .arg(self.port.to_string())
            .args(["--no-auth-warning", "-a", &self.admin_password])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("redis-cli not found: run scripts/install-deps.sh");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
