//! A hostile (or buggy) authorised primary, driven with a gRPC client built
//! from `replication.proto`: numbers that would overflow, a copy that would
//! wrap the replica's position, segments that end before they begin. Each
//! gets INVALID_ARGUMENT naming the field, and the replica it aimed at is
//! left exactly as it was: the same image bytes, positions and points.

mod common;

use std::fs;

use common::{net::*, *};
use vmreplica_agent::replication::shipper::ShipperConfig;
use vmreplica_api::{
    control::FailureKind,
    replication::{
        CopyChunk, CopyStart, DiskRef, OpenRequest, SegmentChunk, SegmentStart,
        replication_client::ReplicationClient,
    },
    tls::channel,
};

const MIB: u64 = 1 << 20;

fn disk() -> Option<DiskRef> {
    Some(DiskRef { vm_id: "vm1".into(), disk_id: "root".into() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_that_would_overflow_are_refused_and_the_replica_is_untouched() {
    let site = replica_site().await;
    let tls = material(&site.ca, &["host1.site-a.example.com"]);
    // A real replica with a copy, a segment and a point.
    let p = tokio::task::spawn_blocking(|| serve_new_image(MIB, b"boot")).await.unwrap();
    let cfg = ShipperConfig { backoff: vec![std::time::Duration::from_millis(100)], ..Default::default() };
    let ship = shipper(&site, &tls, p.disk.clone(), cfg, None);
    ship.sync_once().await.unwrap();
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 0x61 4096 8192".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    ship.sync_once().await.unwrap();
    let replica = applied(&site, seg.last_seq).await;
    let state_before = replica.state().clone();
    let image_before = fs::read(replica.image()).unwrap();
    assert_eq!(state_before.points.len(), 1);

    let mut c = ReplicationClient::new(channel(&site.addr.to_string(), REPLICA_NAME, &tls).unwrap());
    let copy = |next_seq: u64, consistent_from: u64| {
        vec![CopyChunk {
            start: Some(CopyStart { disk: disk(), disk_size: MIB, epoch: 0, next_seq }),
            offset: 0,
            data: vec![0xee; 4096].into(),
            raw_len: 4096,
            last: true,
            consistent_from,
            ..Default::default()
        }]
    };
    // The reported defect: next_seq 0 wrapped the replica's position to 2^64-1.
    for (next, from, field) in [
        (0, 0, "next_seq 0"),
        (1 << 63, 1 << 63, "next_seq 9223372036854775808"),
        (5, 2, "consistent_from 2"),
    ] {
        let err = c.push_initial_copy(tokio_stream::iter(copy(next, from))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err}");
        assert!(err.message().contains(field), "{field}: {err}");
        assert_eq!(*replica.state(), state_before, "{field}: the replica's state changed");
        assert_eq!(fs::read(replica.image()).unwrap(), image_before, "{field}: the image changed");
    }
    assert!(!replica.dir().join("incoming/disk.img.part").exists(), "a refused copy left its file");

    // Segments whose numbers make no sense.
    let segment = |first_seq: u64, last_seq: u64, epoch: u64| {
        vec![SegmentChunk {
            start: Some(SegmentStart { disk: disk(), first_seq, last_seq, epoch, length: 10 }),
            offset: 0,
            data: vec![1; 10].into(),
            compressed: false,
            raw_len: 10,
        }]
    };
    let next = state_before.received_through + 1;
    for (first, last, epoch, field) in [
        (0, 0, 0, "first_seq 0"),
        (next, next - 1, 0, "last_seq"),
        (next, u64::MAX, 0, "last_seq 18446744073709551615"),
        (next, next, u64::MAX, "epoch 18446744073709551615"),
    ] {
        let err = c.push_segment(tokio_stream::iter(segment(first, last, epoch))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err}");
        assert!(err.message().contains(field), "{field}: {err}");
    }
    // Opens with impossible sizes and epochs.
    for (disk_size, epoch, field) in
        [(0, 0, "disk_size 0"), (1 << 50, 0, "disk_size 1125899906842624"), (MIB, u64::MAX, "epoch")]
    {
        let open = OpenRequest {
            disk: disk(),
            disk_size,
            epoch,
            history: None,
            interval_seconds: 0,
            import_awaited: false,
        };
        let err = c.open(open).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err}");
        assert!(err.message().contains(field), "{field}: {err}");
    }
    assert_eq!(*replica.state(), state_before, "the replica's state changed");
    assert_eq!(fs::read(replica.image()).unwrap(), image_before, "the image changed");

    // And replication goes on as if nothing happened.
    let url = p.url();
    tokio::task::spawn_blocking(move || qemu_io(&url, &["write -P 0x62 0 4096".into()])).await.unwrap();
    let seg = p.disk.seal().unwrap().unwrap();
    assert_eq!(ship.sync_once().await.unwrap(), seg.last_seq);
    let replica = applied(&site, seg.last_seq).await;
    assert!(identical(path_str(&replica.image()), path_str(&p.image)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_is_reported_as_tls_naming_the_side_that_refused() {
    let site = replica_site().await;
    let other = vmreplica_tests::pki::Ca::new("another-ca").unwrap();
    let p = tokio::task::spawn_blocking(|| serve_new_image(MIB, b"boot")).await.unwrap();
    // Our certificate is from a CA the replica does not trust (we trust its CA).
    let mut untrusted = material(&other, &["host1.site-a.example.com"]).material();
    untrusted.ca_pem = site.ca.cert_pem.clone();
    let untrusted = vmreplica_api::tls::LiveTls::new(untrusted).unwrap();
    let ship = shipper(&site, &untrusted, p.disk.clone(), ShipperConfig::default(), None);
    let err = ship.sync_once().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("TLS: the server replica.site-b.example.com refused this agent's certificate"),
        "{text}"
    );
    assert!(text.contains("UnknownCA") && text.contains("CA"), "{text}");
    let stats = ship.stats();
    assert_eq!(stats.last_failure, FailureKind::TlsRefused);
    assert_eq!(stats.last_error.as_deref(), Some(text.as_str()));
    // We do not trust the replica's CA.
    let distrusting = material(&other, &["host1.site-a.example.com"]);
    let ship = shipper(&site, &distrusting, p.disk.clone(), ShipperConfig::default(), None);
    let text = ship.sync_once().await.unwrap_err().to_string();
    assert!(
        text.starts_with("TLS: this agent refused the certificate of replica.site-b.example.com"),
        "{text}"
    );
    assert!(text.contains("UnknownIssuer"), "{text}");
    // Nothing was created at the replica either way.
    assert!(site.service.replica("vm1", "root").is_none());
}
