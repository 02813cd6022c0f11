//! The CRD YAML committed under `charts/vmreplica/crds/` is exactly what the
//! types generate; regenerate with
//! `cargo run -p vmreplica-crds --bin crdgen charts/vmreplica/crds`.

use std::{collections::BTreeSet, fs, path::Path};

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/vmreplica/crds");
    let mut expected = BTreeSet::new();
    for crd in vmreplica_crds::crds() {
        let file = vmreplica_crds::crd_file_name(&crd);
        let committed = fs::read_to_string(dir.join(&file)).unwrap_or_else(|e| {
            panic!("{file} is missing ({e}); run `cargo run -p vmreplica-crds --bin crdgen charts/vmreplica/crds`")
        });
        assert!(
            committed == vmreplica_crds::crd_yaml(&crd),
            "charts/vmreplica/crds/{file} is stale; run `cargo run -p vmreplica-crds --bin crdgen charts/vmreplica/crds`"
        );
        expected.insert(file);
    }
    let present: BTreeSet<String> =
        fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(present, expected, "charts/vmreplica/crds/ holds files no type generates");
}

#[test]
fn every_schema_property_has_a_description() {
    // `kubectl explain` shows these; a field without one is undocumented.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let here = format!("{path}.{name}");
                let is_meta = path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
                if !is_meta && sub.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in vmreplica_crds::crds() {
        for v in &crd.spec.versions {
            let schema =
                serde_json::to_value(v.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap())
                    .unwrap();
            walk(&crd.spec.names.kind, &schema, &mut missing);
        }
    }
    // Condition is k8s-openapi's own type: its fields are documented upstream.
    missing.retain(|m| !m.contains(".conditions[]."));
    assert!(missing.is_empty(), "fields without a doc comment:\n{}", missing.join("\n"));
}
