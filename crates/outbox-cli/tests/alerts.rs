//! The alert rules parse as Prometheus rule groups and use only documented metric names.

use yaml_rust2::YamlLoader;

#[test]
fn alert_rules_use_only_documented_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus/outbox-alerts.yml"
    );
    let text = std::fs::read_to_string(path).expect("alert rules file");
    let docs = YamlLoader::load_from_str(&text).expect("valid YAML");
    let groups = docs[0]["groups"].as_vec().expect("groups");
    let docs_md = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/metrics.md"
    ))
    .unwrap();
    let mut rules = 0;
    for g in groups {
        for r in g["rules"].as_vec().expect("rules") {
            let name = r["alert"].as_str().expect("alert name");
            let expr = r["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has an expr"));
            assert!(
                r["labels"]["severity"].as_str().is_some(),
                "{name} has a severity"
            );
            let used: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("outbox_"))
                .collect();
            assert!(!used.is_empty(), "{name} uses an outbox metric");
            for m in used {
                let base = m
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                assert!(
                    outbox::telemetry::ALL.contains(&base)
                        || outbox::consumers::metrics::ALL.contains(&base),
                    "{name} uses unknown metric {m}"
                );
                assert!(
                    docs_md.contains(&format!("`{base}`")),
                    "{m} is not documented in docs/metrics.md"
                );
            }
            rules += 1;
        }
    }
    assert!(
        rules >= 4,
        "lag, dead letters, broker and relay-down alerts at least"
    );
}

#[test]
fn every_metric_is_documented() {
    let docs_md = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/metrics.md"
    ))
    .unwrap();
    for m in outbox::telemetry::ALL
        .iter()
        .chain(outbox::consumers::metrics::ALL)
    {
        assert!(
            docs_md.contains(&format!("`{m}`")),
            "{m} missing from docs/metrics.md"
        );
    }
}
