//! The Debian package (`cargo xtask deb`, which `cargo xtask test` builds from the binary
//! under test and names in PF_DEB): installed with the real dpkg into a root of its own, its
//! binary runs, its unit verifies, its man pages and completions are there and well-formed,
//! and its conffiles survive a remove but not a purge.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::kit::ScratchDir;

use super::common::require_root;

/// The package under test; `cargo xtask test` builds it and sets PF_DEB.
fn pf_deb() -> PathBuf {
    let path = std::env::var_os("PF_DEB")
        .map(PathBuf::from)
        .expect("PF_DEB is not set: run the privileged tests through `cargo xtask test`");
    assert!(path.is_file(), "PF_DEB={} is not a file", path.display());
    path
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg working on `root` instead of this system (maintainer scripts run unchrooted, with
/// DPKG_ROOT set, which the package's postinst honours by touching nothing).
fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display())).args([
        "--force-script-chrootless",
        "--force-depends",
        "--log=/dev/null",
    ]);
    c
}

#[test]
fn the_package_installs_runs_and_removes_cleanly() {
    require_root();
    let deb = pf_deb();
    let root =
        ScratchDir::claim(std::env::temp_dir().join(format!("pf-deb-root-{}", std::process::id())));
    let admin = root.path().join("var/lib/dpkg");
    for dir in ["info", "updates"] {
        std::fs::create_dir_all(admin.join(dir)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();
    run(dpkg(root.path()).arg("-i").arg(&deb));
    let at = |p: &str| root.path().join(p);

    // The binary runs.
    let version = run(Command::new(at("usr/bin/pf")).arg("--version"));
    assert!(version.starts_with("pf "), "{version}");

    // The unit verifies, with its ExecStart pointed at the binary the package installed.
    let unit = std::fs::read_to_string(at("lib/systemd/system/pf.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/pf serve --config /etc/pf/pf.toml"));
    let checked = root.path().join("verify/pf.service");
    std::fs::create_dir_all(checked.parent().unwrap()).unwrap();
    std::fs::write(
        &checked,
        unit.replace("/usr/bin/pf", at("usr/bin/pf").to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The example config the package installs is one pf serve accepts.
    let out = Command::new(at("usr/bin/pf"))
        .args(["serve", "--check-config", "--config"])
        .arg(at("etc/pf/pf.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Man pages for every command, completions that parse.
    let man = run(Command::new("zcat").arg(at("usr/share/man/man1/pf-serve.1.gz")));
    assert!(man.contains("check\\-config"), "{man}");
    for page in ["pf", "pf-reserve", "pf-status", "pf-change", "pf-attach"] {
        assert!(
            at(&format!("usr/share/man/man1/{page}.1.gz")).is_file(),
            "{page}"
        );
    }
    run(Command::new("bash")
        .arg("-n")
        .arg(at("usr/share/bash-completion/completions/pf")));
    let bash = std::fs::read_to_string(at("usr/share/bash-completion/completions/pf")).unwrap();
    assert!(
        bash.contains("--check-config") && bash.contains("status"),
        "{bash}"
    );
    for path in [
        "usr/share/zsh/vendor-completions/_pf",
        "usr/share/fish/vendor_completions.d/pf.fish",
        "usr/lib/sysusers.d/pf.conf",
        "usr/lib/tmpfiles.d/pf.conf",
        "etc/logrotate.d/pf",
        "etc/pf/pf.nft",
        "usr/share/doc/pf/copyright",
    ] {
        assert!(at(path).is_file(), "{path} is not installed");
    }
    let sysusers = std::fs::read_to_string(at("usr/lib/sysusers.d/pf.conf")).unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("g pf")),
        "{sysusers}"
    );

    // Conffiles: an edited config survives a remove; a purge takes it.
    std::fs::write(at("etc/pf/pf.toml"), "# edited\n").unwrap();
    run(dpkg(root.path()).args(["-r", "pf"]));
    assert!(!at("usr/bin/pf").exists());
    assert_eq!(
        std::fs::read_to_string(at("etc/pf/pf.toml")).unwrap(),
        "# edited\n"
    );
    run(dpkg(root.path()).args(["-P", "pf"]));
    assert!(!at("etc/pf/pf.toml").exists());
}
