use super::*;
use crate::vmreplication::monitoring::*;
use kube::runtime::events::EventType;

use crate::status::transitions;
use vmreplica_crds::{DiskSpec as CrdDisk, ServerAddress, VMReplicationSpec as Spec};

fn vmr(node: Option<&str>) -> VMReplication {
    let spec: Spec = serde_json::from_value(serde_json::json!({
        "role": "Primary",
        "disks": [{"name": "root", "path": "/var/lib/vmreplica/disks/a/root.img"}],
        "replicaServer": {"name": "replica.site-b.test", "port": 9443},
        "replicationFrequencySeconds": 30,
    }))
    .unwrap();
    let mut v = VMReplication::new("db", Spec { node: node.map(Into::into), ..spec });
    v.metadata.namespace = Some("prod".into());
    v.metadata.uid = Some("u-1".into());
    v.metadata.generation = Some(3);
    v
}

fn agent(node: &str, caps: &str) -> Agent {
    Agent {
        node: node.into(),
        control_endpoint: Some(format!("{node}:9444")),
        replication_endpoint: None,
        capabilities: caps.split(',').map(Into::into).collect(),
        labels: Default::default(),
        live: true,
        server_name: None,
    }
}

#[test]
fn the_agent_spec_carries_identity_and_settings() {
    let s = agent_spec(&vmr(None)).unwrap();
    assert_eq!((s.vm_id.as_str(), s.uid.as_str(), s.generation), ("prod.db", "u-1", 3));
    assert_eq!(s.replica_address, "replica.site-b.test:9443");
    assert_eq!((s.interval_seconds, s.compression, s.suspended), (30, true, false));
    assert_eq!(s.disks[0].path, "/var/lib/vmreplica/disks/a/root.img");
    let mut no_server = vmr(None);
    no_server.spec.replica_server = None;
    assert!(agent_spec(&no_server).unwrap_err().contains("spec.replicaServer is required"));
    let _ = (CrdDisk { name: "x".into(), path: "/x".into() }, ServerAddress { name: "x".into(), port: 1 });

    let mut later = vmr(None);
    later.spec.initial_replication.start_time = Some(Time(Timestamp::from_second(2_000_000_000).unwrap()));
    assert_eq!(agent_spec(&later).unwrap().initial_replication_at_unix_ms, 2_000_000_000_000);
    let mut media = vmr(None);
    media.spec.initial_replication.method = vmreplica_crds::InitialReplicationMethod::ExternalMedia;
    assert!(agent_spec(&media).unwrap_err().contains("needs initialReplication.directory"));
    media.spec.initial_replication.directory = Some("/media/usb".into());
    let s = agent_spec(&media).unwrap();
    assert_eq!((s.initial_method.as_str(), s.initial_directory.as_str()), ("ExternalMedia", "/media/usb"));
    let mut existing = vmr(None);
    existing.spec.initial_replication.method = vmreplica_crds::InitialReplicationMethod::ExistingImage;
    assert_eq!(agent_spec(&existing).unwrap().initial_method, "ExistingImage");
}

#[test]
fn an_agent_is_chosen_by_node_or_when_it_is_the_only_one() {
    let one = [agent("n1", "primary"), agent("r1", "replica")];
    assert_eq!(choose_agent(&vmr(None), &one).unwrap().node, "n1");
    let two = [agent("n1", "primary"), agent("n2", "primary")];
    assert!(choose_agent(&vmr(None), &two).unwrap_err().contains("set spec.node"));
    assert_eq!(choose_agent(&vmr(Some("n2")), &two).unwrap().node, "n2");
    assert!(choose_agent(&vmr(Some("n9")), &two).unwrap_err().contains("\"n9\""));
    assert!(choose_agent(&vmr(None), &[agent("r1", "replica")]).unwrap_err().contains("no agent"));
}

fn disk(vm: &str, name: &str) -> PrimaryDisk {
    PrimaryDisk { vm_id: vm.into(), disk_id: name.into(), disk_size: 1 << 20, ..Default::default() }
}

#[test]
fn the_view_sums_a_vms_disks_only() {
    let mut a = disk("prod.db", "root");
    a.successful_cycles = 4;
    a.missed_cycles = 1;
    a.segments_sent = 2;
    a.average_segment_bytes = 100;
    a.last_replication_unix_ms = 5_000;
    a.pending_bytes = 7;
    let mut b = disk("prod.db", "data");
    b.successful_cycles = 3;
    b.missed_cycles = 2;
    b.last_replication_unix_ms = 4_000;
    b.last_error = "replica refused: boom".into();
    b.failure_kind = FailureKind::Unreachable as i32;
    let other = disk("prod.other", "root");
    let v = view("prod.db", &[a.clone(), b, other]);
    assert_eq!((v.disks, v.replicated, v.successful, v.missed), (2, 2, 3, 2));
    assert_eq!((v.raw_bytes, v.pending_bytes, v.copy_total), (200, 7, 0), "both copies done, nothing sent");
    assert_eq!(v.last_replication_ms, Some(4_000), "the oldest disk decides");
    assert_eq!(v.failure.as_ref().unwrap().0, FailureKind::Unreachable);
    let mut never = disk("prod.db", "data");
    never.last_replication_unix_ms = 0;
    assert_eq!(
        view("prod.db", &[a.clone(), never.clone()]).last_replication_ms,
        None,
        "a disk never replicated"
    );
    // A copy in flight: what it sent of its allocated bytes; one not started: the disk's size.
    never.copy_sent_bytes = 300;
    never.copy_total_bytes = 1000;
    let fresh = disk("prod.db", "logs");
    let v = view("prod.db", &[never, fresh]);
    assert_eq!((v.copy_done, v.copy_total), (300, 1000 + (1 << 20)));
}

#[test]
fn states_follow_the_agents_numbers() {
    use ReplicationState::*;
    let mut v = VmView { disks: 2, ..Default::default() };
    let on = |v: &VmView, suspended| state(suspended, &Outcome::Enabled(Box::new(v.clone())), NotEnabled);
    assert_eq!(on(&v, false), ReadyForInitialReplication);
    v.copy_done = 10;
    assert_eq!(on(&v, false), WaitingForInitialReplication);
    v.replicated = 1;
    assert_eq!(on(&v, false), WaitingForInitialReplication, "one disk still copying");
    v.replicated = 2;
    assert_eq!(on(&v, false), Replicating);
    assert_eq!(on(&v, true), Suspended);
    v.resync_required = true;
    assert_eq!(on(&v, false), WaitingForStartResynchronize);
    v.resync_required = false;
    v.failure = Some((FailureKind::RefusedPermission, "no entry matches".into()));
    assert_eq!(on(&v, false), Error);
    let invalid = Outcome::Invalid { reason: "NoAgent", message: "x".into() };
    assert_eq!(state(false, &invalid, Replicating), Error);
    assert_eq!(state(false, &Outcome::AgentUnavailable("x".into()), Replicating), Replicating);
}

fn input(outcome: &Outcome, window: Baseline, now_ms: i64) -> HealthInput<'_> {
    HealthInput {
        state: ReplicationState::Replicating,
        outcome,
        window,
        now_ms,
        since_ms: 0,
        frequency: Duration::from_secs(30),
        lag_warning: Duration::from_secs(3600),
    }
}

#[test]
fn health_rules_fire_with_details() {
    let ok = VmView { disks: 1, replicated: 1, last_replication_ms: Some(1_000_000), ..Default::default() };
    let w = |s, m| Baseline { successful: s, missed: m, ..Default::default() };
    let (h, d) = health(&input(&Outcome::Enabled(Box::new(ok.clone())), w(10, 2), 1_010_000));
    assert_eq!((h, d.len()), (Health::Normal, 0), "{d:?}");

    let (h, d) = health(&input(&Outcome::Enabled(Box::new(ok.clone())), w(7, 3), 1_010_000));
    assert_eq!(h, Health::Warning);
    assert!(d[0].contains("3 of 10 replication cycles"), "{d:?}");

    let (h, d) = health(&input(&Outcome::Enabled(Box::new(ok.clone())), w(10, 0), 1_000_000 + 2 * 3_600_000));
    assert_eq!(h, Health::Warning);
    assert!(d[0].contains("2h0m behind"), "{d:?}");

    let mut failing = ok.clone();
    failing.failure = Some((FailureKind::Unreachable, "disk root: connection refused".into()));
    let (h, _) = health(&input(&Outcome::Enabled(Box::new(failing.clone())), w(10, 1), 1_000_000 + 299_000));
    assert_eq!(h, Health::Normal, "failing for less than ten intervals");
    let (h, d) = health(&input(&Outcome::Enabled(Box::new(failing)), w(10, 1), 1_000_000 + 301_000));
    assert_eq!(h, Health::Critical);
    assert!(
        d[0].contains("No replication cycle has succeeded for 5m") && d[0].contains("connection refused")
    );

    let mut tls = ok.clone();
    let why = "disk root: TLS: the server b refused this agent's certificate (UnknownCA)";
    tls.failure = Some((FailureKind::TlsRefused, why.into()));
    let (h, d) = health(&input(&Outcome::Enabled(Box::new(tls.clone())), w(0, 0), 1_000_000));
    assert_eq!(h, Health::Critical, "at once: retrying does not fix a certificate");
    assert!(d[0].contains("TLS handshake") && d[0].contains("UnknownCA"), "{d:?}");
    assert!(!d[0].contains("AuthorizationEntry"), "not an authorisation problem: {d:?}");
    assert_eq!(
        state(false, &Outcome::Enabled(Box::new(tls)), ReplicationState::Replicating),
        ReplicationState::Error
    );

    let mut faulted = ok.clone();
    let why = "disk root: the log in /var/lib/x is faulted since disk image /d/root.img: Input/output error";
    faulted.failure = Some((FailureKind::DiskFaulted, why.into()));
    let (h, d) = health(&input(&Outcome::Enabled(Box::new(faulted.clone())), w(10, 0), 1_000_000));
    assert_eq!(h, Health::Critical, "at once: retrying does not repair storage");
    assert!(d[0].contains("Input/output error") && d[0].contains("restart the vmreplica agent"), "{d:?}");
    assert_eq!(
        state(false, &Outcome::Enabled(Box::new(faulted)), ReplicationState::Replicating),
        ReplicationState::Error
    );

    let mut fenced = ok.clone();
    fenced.fenced_epoch = 3;
    fenced.failure = Some((FailureKind::StaleEpoch, "refused this primary's epoch 1".into()));
    let (h, d) = health(&input(&Outcome::Enabled(Box::new(fenced.clone())), w(0, 0), 1_000_000));
    assert_eq!(h, Health::Critical);
    assert!(
        d[0].contains("Fenced") && d[0].contains("epoch 3") && d[0].contains("Fail the VM back"),
        "{d:?}"
    );
    assert_eq!(
        state(false, &Outcome::Enabled(Box::new(fenced)), ReplicationState::Replicating),
        ReplicationState::Error
    );

    let mut refused = ok;
    refused.failure = Some((FailureKind::RefusedPermission, "no AuthorizationEntry matches".into()));
    let (h, d) = health(&input(&Outcome::Enabled(Box::new(refused)), w(0, 0), 1_000_000));
    assert_eq!(h, Health::Critical);
    assert!(d[0].contains("add an AuthorizationEntry"), "{d:?}");

    let down = Outcome::AgentUnavailable("the agent on node n1 is not running".into());
    let (h, d) = health(&input(&down, w(0, 0), 0));
    assert_eq!(h, Health::Critical);
    assert!(d[0].contains("node n1"));
}

#[test]
fn monitoring_windows_start_at_the_configured_time() {
    let h = 3_600_000i64;
    let day = 24 * h;
    // 12h windows from 09:00: at 08:00 the window began at 21:00 the day before.
    assert_eq!(window_start(10 * day + 8 * h, Duration::from_secs(12 * 3600), 9 * 60), 9 * day + 21 * h);
    assert_eq!(window_start(10 * day + 9 * h, Duration::from_secs(12 * 3600), 9 * 60), 10 * day + 9 * h);
    assert_eq!(parse_interval("12h"), Some(Duration::from_secs(43_200)));
    assert_eq!(parse_interval("2d"), Some(Duration::from_secs(172_800)));
    assert_eq!(parse_interval("5m"), None);
    assert_eq!(parse_time_of_day("09:30"), Some(570));
    assert_eq!(parse_time_of_day("24:00"), None);
    let v = VmView { successful: 5, missed: 1, ..Default::default() };
    let after_restart = in_window(&v, &Baseline { successful: 9, missed: 0, ..Default::default() });
    assert_eq!((after_restart.successful, after_restart.missed), (5, 1), "counters went back: from zero");
}

#[test]
fn every_state_and_health_change_is_an_event() {
    let before = VMReplicationStatus::default();
    let after = VMReplicationStatus {
        state: ReplicationState::Error,
        health: Health::Critical,
        health_details: vec!["Replication is in error: no agent".into()],
        ..Default::default()
    };
    let events = transitions(&before, &after);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].reason, "Error");
    assert!(matches!(events[0].type_, EventType::Warning));
    assert_eq!(events[1].reason, "HealthCritical");
    assert!(events[1].note.as_ref().unwrap().contains("no agent"));
    assert!(transitions(&after, &after).is_empty(), "no change, no event");
    assert_eq!(lag_text(Duration::from_secs(59)), "<1m");
    assert_eq!(lag_text(Duration::from_secs(3 * 3600 + 120)), "3h2m");
}

#[test]
fn a_point_that_could_not_be_quiesced_is_a_warning_and_an_event_each_time() {
    let ok = VmView { disks: 1, replicated: 1, last_replication_ms: Some(1_000_000), ..Default::default() };
    let mut unquiesced = ok.clone();
    let why = "the guest agent at /run/qga.sock did not answer: no answer to guest-sync within 5s";
    unquiesced.quiesce_failed = Some((1_000_000, why.into()));
    let (h, d) =
        health(&input(&Outcome::Enabled(Box::new(unquiesced.clone())), Baseline::default(), 1_000_000));
    assert_eq!(h, Health::Warning, "{d:?}");
    assert!(d[0].starts_with(crate::status::QUIESCE_FAILED) && d[0].contains("guest-sync"), "{d:?}");
    assert!(d[0].contains("1970-01-01T00:16:40Z") && d[0].contains("crash-consistent"), "{d:?}");

    let mut frozen = unquiesced.clone();
    frozen.thaw_pending = true;
    let (h, d) = health(&input(&Outcome::Enabled(Box::new(frozen)), Baseline::default(), 1_000_000));
    assert_eq!(h, Health::Critical);
    assert!(d[0].contains("may still be frozen") && d[0].contains("guest-sync"), "{d:?}");

    // The first failure is an Event, the same one again is not, the next
    // attempt's (a new time) is.
    let status = |v: &VmView| {
        let (health, health_details) =
            health(&input(&Outcome::Enabled(Box::new(v.clone())), Baseline::default(), 0));
        VMReplicationStatus { health, health_details, ..Default::default() }
    };
    let normal = status(&ok);
    let first = status(&unquiesced);
    let reasons = |a: &VMReplicationStatus, b: &VMReplicationStatus| {
        transitions(a, b).into_iter().map(|e| e.reason).collect::<Vec<_>>()
    };
    assert_eq!(reasons(&normal, &first), ["HealthWarning", "QuiesceFailed"]);
    assert!(reasons(&first, &first).is_empty());
    unquiesced.quiesce_failed = Some((4_600_000, why.into()));
    let again = status(&unquiesced);
    assert_eq!(reasons(&first, &again), ["QuiesceFailed"]);
    assert_eq!(reasons(&first, &normal), ["HealthNormal"], "a quiesced point clears it");
}
