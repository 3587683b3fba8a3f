//! The files in `deploy/` use only flags and environment variables that `outbox relay --help`
//! lists, their database lists parse, and their probes and scrape settings name the paths a real
//! `outbox relay` serves, on the port of its default `--metrics-addr`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use testkit::{eventually, TestDb, TestStream};
use yaml_rust2::{Yaml, YamlLoader};

/// Variables the relay reads that are not flags: `RUST_LOG` (the log filter, `logging::init`).
const NOT_FLAGS: &[&str] = &["RUST_LOG"];

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// What `outbox relay --help` offers.
struct Help {
    flags: BTreeSet<String>,
    envs: BTreeSet<String>,
    text: String,
}

impl Help {
    fn load() -> Self {
        let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["relay", "--help"])
            .env_clear()
            .output()
            .expect("outbox relay --help");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let flags = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("--"))
            .map(|l| format!("--{}", l.split([' ', '=']).next().unwrap()))
            .collect();
        let envs = text
            .match_indices("[env: ")
            .map(|(i, _)| {
                let rest = &text[i + 6..];
                rest[..rest.find('=').unwrap()].to_string()
            })
            .collect();
        Self { flags, envs, text }
    }

    fn check_flags<'a>(&self, file: &str, args: impl IntoIterator<Item = &'a str>) -> usize {
        let mut n = 0;
        for a in args.into_iter().filter(|a| a.starts_with("--")) {
            let flag = a.split('=').next().unwrap();
            assert!(
                self.flags.contains(flag),
                "{file} uses {flag}, which `outbox relay --help` does not list"
            );
            n += 1;
        }
        n
    }

    fn check_envs<'a>(&self, file: &str, names: impl IntoIterator<Item = &'a str>) -> usize {
        let mut n = 0;
        for name in names {
            assert!(
                self.envs.contains(name) || NOT_FLAGS.contains(&name),
                "{file} sets {name}, which `outbox relay --help` does not list"
            );
            n += 1;
        }
        n
    }

    /// The port of the default `--metrics-addr`.
    fn default_metrics_port(&self) -> u16 {
        let at = self.text.find("--metrics-addr").expect("--metrics-addr");
        let rest = &self.text[at..];
        let d = &rest[rest.find("[default: ").expect("a default") + 10..];
        let addr = &d[..d.find(']').unwrap()];
        addr.rsplit(':').next().unwrap().parse().expect("a port")
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().expect("host:port")
}

fn strs(y: &Yaml) -> Vec<&str> {
    y.as_vec()
        .map(|v| v.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default()
}

/// The deploy files' probe and scrape paths, checked against a running relay after the static
/// checks.
#[derive(Default)]
struct Served {
    paths: BTreeMap<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_files_use_only_what_the_relay_offers() {
    let help = Help::load();
    let default_port = help.default_metrics_port();
    let mut served = Served::default();

    // --- systemd ----------------------------------------------------------------------------
    let unit = read("systemd/outbox-relay.service");
    let directive = |name: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("the unit sets {name}="))
            .trim()
            .to_string()
    };
    let exec = directive("ExecStart");
    let mut words = exec.split_whitespace();
    assert!(words.next().unwrap().ends_with("/outbox"));
    assert_eq!(words.next(), Some("relay"));
    help.check_flags("outbox-relay.service", words);
    assert_eq!(directive("KillSignal"), "SIGTERM");
    assert!(["always", "on-failure"].contains(&directive("Restart").as_str()));
    assert!(directive("EnvironmentFile").ends_with("relay.env"));
    let env_file = read("systemd/relay.env");
    // Commented-out settings too: operators uncomment them.
    let env_names: Vec<&str> = env_file
        .lines()
        .map(|l| l.strip_prefix('#').unwrap_or(l))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(help.check_envs("relay.env", env_names.iter().copied()) >= 10);
    let addr = env_file
        .lines()
        .find_map(|l| l.strip_prefix("OUTBOX_METRICS_ADDR="))
        .expect("relay.env sets the metrics address");
    assert_eq!(
        port_of(addr),
        default_port,
        "relay.env keeps the default port"
    );
    let dbs = outbox_cli::databases::parse_file(&deploy("systemd/databases.example"))
        .expect("databases.example parses");
    assert!(dbs.len() >= 2 && dbs.iter().all(|d| d.named));

    // --- Kubernetes -------------------------------------------------------------------------
    let kustomization = YamlLoader::load_from_str(&read("kubernetes/kustomization.yaml")).unwrap();
    let mut docs = Vec::new();
    for r in strs(&kustomization[0]["resources"]) {
        docs.extend(YamlLoader::load_from_str(&read(&format!("kubernetes/{r}"))).unwrap());
    }
    let of_kind = |k: &str| -> Vec<&Yaml> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(k))
            .collect()
    };
    let config = of_kind("ConfigMap")[0];
    let config_data = config["data"].as_hash().expect("ConfigMap data");
    let deployment = of_kind("Deployment")[0];
    let spec = &deployment["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    assert_eq!(strs(&container["args"])[0], "relay");
    help.check_flags("relay-deployment.yaml", strs(&container["args"]));
    let mut env_names: Vec<&str> = container["env"]
        .as_vec()
        .map(|v| v.iter().filter_map(|e| e["name"].as_str()).collect())
        .unwrap_or_default();
    for from in container["envFrom"].as_vec().expect("envFrom") {
        assert_eq!(
            from["configMapRef"]["name"].as_str(),
            config["metadata"]["name"].as_str(),
            "the Deployment reads the ConfigMap"
        );
        env_names.extend(config_data.keys().filter_map(|k| k.as_str()));
    }
    assert!(help.check_envs("relay-config.yaml", env_names) >= 10);
    let metrics_port = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .and_then(|p| p["containerPort"].as_i64())
        .expect("a port named metrics") as u16;
    assert_eq!(
        metrics_port, default_port,
        "the container port is the binary's default"
    );
    let listen = config_data
        .get(&Yaml::String("OUTBOX_METRICS_ADDR".into()))
        .and_then(|v| v.as_str())
        .expect("the ConfigMap sets OUTBOX_METRICS_ADDR");
    assert!(listen.starts_with("0.0.0.0:"), "reachable by the kubelet");
    assert_eq!(port_of(listen), metrics_port);
    for (probe, want) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        let path = get["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{probe} path"));
        assert_eq!(path, want, "{probe}");
        let port = match &get["port"] {
            Yaml::String(s) => {
                assert_eq!(s, "metrics");
                metrics_port
            }
            p => p.as_i64().expect("probe port") as u16,
        };
        assert_eq!(port, default_port, "{probe} port");
        served.paths.insert(probe.into(), path.into());
    }
    let ann = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        ann["prometheus.io/port"]
            .as_str()
            .map(|p| p.parse::<u16>().unwrap()),
        Some(default_port)
    );
    served.paths.insert(
        "prometheus.io/path".into(),
        ann["prometheus.io/path"]
            .as_str()
            .expect("scrape path")
            .into(),
    );
    assert!(
        container["resources"]["requests"]["cpu"].as_str().is_some()
            && container["resources"]["requests"]["memory"]
                .as_str()
                .is_some(),
        "resource requests"
    );
    let replicas = deployment["spec"]["replicas"].as_i64().unwrap();
    assert!(replicas >= 2, "several replicas share the leases");
    let pdb = of_kind("PodDisruptionBudget")[0];
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"],
        "the budget covers the relay pods"
    );
    let secret = of_kind("Secret")[0];
    let listed = secret["stringData"]["databases"]
        .as_str()
        .expect("databases");
    for line in listed.lines().filter(|l| !l.trim().is_empty()) {
        outbox_cli::databases::parse_one(line, "relay-secret.yaml").expect("NAME=URL");
    }
    let file_env = config_data
        .get(&Yaml::String("OUTBOX_DATABASES_FILE".into()))
        .and_then(|v| v.as_str())
        .expect("the ConfigMap names the databases file");
    let mount = spec["containers"][0]["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap();
    assert!(file_env.starts_with(mount), "the databases file is mounted");

    // --- compose ----------------------------------------------------------------------------
    let compose = &YamlLoader::load_from_str(&read("compose.yaml")).unwrap()[0];
    let relay = &compose["services"]["relay"];
    let command = strs(&relay["command"]);
    assert_eq!(command.first().copied(), Some("relay"));
    help.check_flags("compose.yaml", command);
    let env = relay["environment"].as_hash().expect("relay environment");
    help.check_envs("compose.yaml", env.keys().filter_map(|k| k.as_str()));
    let listen = env
        .get(&Yaml::String("OUTBOX_METRICS_ADDR".into()))
        .and_then(|v| v.as_str())
        .expect("compose sets OUTBOX_METRICS_ADDR");
    assert_eq!(port_of(listen), default_port);
    assert!(strs(&relay["ports"]).contains(&format!("{default_port}:{default_port}").as_str()));
    for s in ["postgres", "nats", "rabbitmq", "relay", "inventory"] {
        assert!(!compose["services"][s].is_badvalue(), "compose runs {s}");
    }

    // --- the paths, against a real relay ---------------------------------------------------
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _relay = RelayProcess::spawn(&db, &stream, &["--metrics-addr", &addr]);
    for (what, path) in &served.paths {
        assert!(
            eventually(Duration::from_secs(15), || async {
                http_code(port, path).await == Some(200)
            })
            .await,
            "{what} {path} answers 200 on a healthy relay"
        );
    }
}

async fn http_code(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}
