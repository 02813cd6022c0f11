//! Every binary of the workspace answers `--help` with its usage and does
//! nothing else (no control plane started, no file written).

use std::process::Command;

use vmreplica_tests::procs::bin;

#[test]
fn every_binary_answers_help_with_usage_and_touches_nothing() {
    for name in
        ["vmreplica-agent", "vmreplica-controller", "vmreplica-testenv", "vmreplica-devcerts", "crdgen"]
    {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin(name)).arg("--help").current_dir(dir.path()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --help failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("Usage:"), "{name} --help printed no usage:\n{text}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{name} --help wrote a file");
        // A wrong argument is refused with the usage, not acted on.
        let out = Command::new(bin(name)).arg("--no-such-flag").current_dir(dir.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name} accepted --no-such-flag");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{name} wrote a file");
    }
}
