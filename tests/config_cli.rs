//! `render` and `check-config` read the configuration exactly as `run` does: the file, then
//! the same flags and environment variables, then validation.

use std::process::Command;

fn cpha(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cpha"));
    cmd.args(args).env_remove("CPHA_HAPROXY_BIND").env_remove("CPHA_LISTEN").env_remove("CPHA_TOPOLOGY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running cpha");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_config_validates_the_frontend_the_environment_sets() {
    let host = example("config-host.yaml");
    let (code, out, err) = cpha(&["check-config", "--config", &host], &[("CPHA_HAPROXY_BIND", "192.0.2.11:9445")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("HAProxy frontend 192.0.2.11:9445"), "{out}");
    let (code, out, err) = cpha(&["check-config", "--config", &host], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("HAProxy frontend 192.0.2.10:9445"), "without the override, the file's: {out}");
    // An override that breaks validation is refused like a bad file (exit 78).
    let (code, _, err) = cpha(&["check-config", "--config", &host], &[("CPHA_HAPROXY_BIND", "192.0.2.10:8443")]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("equals endpoint.listen"), "{err}");
}

#[test]
fn render_uses_the_same_overrides() {
    let host = example("config-host.yaml");
    let args = ["render", "--config", &host, "--members", "10.0.0.11, cp2=10.0.0.12:7443"];
    let (code, out, err) = cpha(&args, &[("CPHA_HAPROXY_BIND", "192.0.2.11:9445")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bind 192.0.2.11:9445"), "{out}");
    assert!(out.contains("server cp2 10.0.0.12:7443"), "{out}");
    let (_, flag, _) = cpha(&[&args[..], &["--haproxy-bind", "192.0.2.12:9445"]].concat(), &[]);
    assert!(flag.contains("bind 192.0.2.12:9445"), "{flag}");
}
