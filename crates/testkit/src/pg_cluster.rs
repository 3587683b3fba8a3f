//! A private PostgreSQL server for tests that must stop and restart a database server: the shared
//! server on 5432 serves other tests at the same time and is never touched.
//!
//! `initdb` into a directory of its own, `pg_ctl start` on a free loopback port (trust auth,
//! user `root`, `fsync` off: the test needs a server that crashes and recovers, not durability
//! across power loss). PostgreSQL refuses to run as root, so as root the tools run as the
//! `postgres` user through `runuser`. Dropping the value stops the server and removes the
//! directory, also when the test panics.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Where the server binaries are: `TEST_PG_BIN`, otherwise the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn pg_bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TEST_PG_BIN") {
        return d.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (or set TEST_PG_BIN)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .expect("a PostgreSQL version with pg_ctl under /usr/lib/postgresql")
}

/// A PostgreSQL server of the test's own; stopped and removed on drop.
pub struct PgCluster {
    /// Loopback port (stable across restarts).
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

impl PgCluster {
    /// Creates and starts a cluster on a free port; waits until it accepts connections.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(crate::unique("pgcluster"));
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        // PostgreSQL refuses to run as root.
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:", dir.to_str().unwrap()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown the cluster directory to postgres");
        }
        let me = Self {
            port: crate::relay::free_port(),
            dir,
            bin: pg_bin_dir(),
            as_postgres,
        };
        let data = me.data();
        let out = me.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "root",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb: {}", lossy(&out));
        me.start_again();
        me
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()))
    }

    /// Starts the (stopped) server on its port and waits until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let data = self.data();
        let out = self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "30", "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            lossy(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server the hard way (`-m immediate`: every backend killed, no checkpoint; the
    /// next start runs crash recovery), as a database host that dies would.
    pub fn crash(&self) {
        let data = self.data();
        let out = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", lossy(&out));
    }

    /// URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{db}", self.port)
    }
}

fn lossy(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
