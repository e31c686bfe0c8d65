//! Bad input and missing prerequisites: a one-line error that says what to do, the right exit
//! code, and nothing left in the kernel.

mod support;

use anyhow::Result;
use support::Lab;

fn run(lab: &Lab, env_path: Option<&str>, prefix: &[&str], args: &[&str]) -> Result<(i32, String)> {
    let mut cmd = lab.host.command(prefix.first().copied().unwrap_or(support::cpha()));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg(support::cpha());
    }
    cmd.args(args);
    if let Some(path) = env_path {
        cmd.env("PATH", path);
    }
    let out = cmd.output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[test]
fn bad_input_and_missing_prerequisites_change_nothing() {
    let lab = Lab::new(false).unwrap();
    let before = lab.ruleset().unwrap();
    let listen = lab.listen_addr(8443);
    let target = lab.server_addr(6443);

    let (code, err) = run(&lab, None, &[], &["forward", "--listen", "10.1.0.1", "--to", &target]).unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("has no port"), "{err}");

    let (code, err) =
        run(&lab, None, &[], &["forward", "--listen", &listen, "--to", "127.0.0.1:6443", "--mode", "nftables"])
            .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("route_localnet"), "{err}");

    let (code, err) =
        run(&lab, None, &[], &["forward", "--listen", &listen, "--to", "[fd02::2]:6443", "--mode", "iptables"])
            .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("IPv4 and IPv6"), "{err}");

    // A wildcard listen on a local target's own port would capture the apiserver itself.
    let (code, err) =
        run(&lab, None, &[], &["forward", "--listen", "0.0.0.0:7443", "--to", "10.2.0.1:7443", "--mode", "nftables"])
            .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("different load-balancer port"), "{err}");

    // No nft binary: the explicit mode says what to install. PATH holds only `ip`, which the
    // lab needs to enter the namespace.
    let bare = lab.tmp.join("bare-path");
    std::fs::create_dir_all(&bare).unwrap();
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    std::os::unix::fs::symlink(ip, bare.join("ip")).unwrap();
    let (code, err) = run(
        &lab,
        Some(bare.to_str().unwrap()),
        &[],
        &["forward", "--listen", &listen, "--to", &target, "--mode", "nftables"],
    )
    .unwrap();
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("apt-get") || err.contains("Debian package: nftables"), "{err}");

    // No CAP_NET_ADMIN: refused before anything is attempted.
    let (code, err) = run(
        &lab,
        None,
        &["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"],
        &["forward", "--listen", &listen, "--to", &target, "--mode", "nftables"],
    )
    .unwrap();
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");

    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(lab.ruleset().unwrap(), before, "a failed forward left rules behind");
}
