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

/// `check-config` on the shipped examples, as the README and the examples' headers say it, on
/// whatever machine runs the tests: `--host-address` stands in for the address a host of the
/// example would have on the virtual IP's subnet.
#[test]
fn check_config_accepts_the_shipped_examples_on_any_machine() {
    for (file, host, peers) in [
        ("config-host.yaml", "192.0.2.11/24", "192.0.2.12"),
        ("config-external-lb.yaml", "192.0.2.21/24", "192.0.2.22"),
        ("config-daemonset.yaml", "192.0.2.11/24", "192.0.2.12"),
    ] {
        let path = example(file);
        let (code, out, err) = cpha(&["check-config", "--config", &path, "--host-address", host], &[]);
        assert_eq!(code, 0, "{file}: {out}{err}");
        let address = host.split('/').next().unwrap();
        assert!(
            out.contains(&format!("(this host's address {host}): keepalived --config-test accepts the rendered file")),
            "{file}: {out}"
        );
        let args = ["render", "--keepalived", "--config", &path, "--host-address", host];
        let (code, conf, err) = cpha(&args, &[]);
        assert_eq!(code, 0, "{file}: {err}");
        assert!(conf.contains(&format!("unicast_src_ip {address}")), "{file}: {conf}");
        assert!(conf.contains(&format!("unicast_peer {{\n        {peers}\n")), "{file}: {conf}");
    }
    // On a machine with no address on the virtual IP's subnet (a network namespace of its own,
    // whose one interface has no address; root only): refused without the flag, as the README's
    // command would be, and accepted with it.
    let path = example("config-host.yaml");
    if nix::unistd::geteuid().is_root() {
        let in_empty_netns = |extra: &[&str]| {
            let script = "ip link add cpha0 type veth peer name cpha1 && ip link set cpha0 up && exec \"$@\"";
            let mut cmd = Command::new("unshare");
            cmd.args([
                "--net",
                "sh",
                "-c",
                script,
                "sh",
                env!("CARGO_BIN_EXE_cpha"),
                "check-config",
                "--config",
                &path,
            ]);
            cmd.args(extra).env_remove("CPHA_HAPROXY_BIND").env_remove("CPHA_LISTEN").env_remove("CPHA_TOPOLOGY");
            cmd.output().expect("running unshare")
        };
        let out = in_empty_netns(&[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains("outside every interface's subnet"), "{err}");
        let out = in_empty_netns(&["--host-address", "192.0.2.11/24"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // An address whose subnet does not hold the virtual IP is a usage error, saying why.
    let (code, _, err) = cpha(&["check-config", "--config", &path, "--host-address", "10.0.0.5/24"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--host-address 10.0.0.5/24") && err.contains("outside"), "{err}");
    let (code, _, err) = cpha(&["check-config", "--config", &path, "--host-address", "192.0.2.11"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("write it as ADDRESS/PREFIX"), "{err}");
}

#[test]
fn check_config_validates_the_frontend_the_environment_sets() {
    let host = example("config-host.yaml");
    let check = ["check-config", "--config", &host, "--host-address", "192.0.2.11/24"];
    let (code, out, err) = cpha(&check, &[("CPHA_HAPROXY_BIND", "192.0.2.11:9445")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("HAProxy frontend 192.0.2.11:9445"), "{out}");
    let (code, out, err) = cpha(&check, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("HAProxy frontend 192.0.2.10:9445"), "without the override, the file's: {out}");
    // An override that breaks validation is refused like a bad file (exit 78).
    let (code, _, err) = cpha(&check, &[("CPHA_HAPROXY_BIND", "192.0.2.10:8443")]);
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
