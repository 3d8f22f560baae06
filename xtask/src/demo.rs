//! `cargo xtask demo`: pf's main job, shown with real traffic. Three network namespaces play the
//! internet host, the VPN server and the tunnel client. `pf serve` on the server attaches to
//! the public interface; a customer's reservation, made through it, forwards a public port to
//! the client's web server. Then a trigger rule: a port that stays closed until the client's
//! own packet opens it; and a reservation with limits, whose deny-list drops the internet
//! host's packets in XDP. Everything is torn down at the end, also on failure.

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use pf_tests::{
    kit::ScratchDir,
    kit::serve::Service,
    kit::topology::{CLIENT_IP, INTERNET_IP, PUBLIC_IFACE, PUBLIC_IP, Topology},
};

/// The demo's own pin directory, so it never touches an instance an admin runs at the default.
const PIN_DIR: &str = "/sys/fs/bpf/pf-demo";

fn show(title: &str) {
    println!("\n== {title}");
}

/// Runs and prints a command as an admin would type it (the pf path shortened to `pf`).
fn step(label: &str, cmd: &mut Command) -> Result<String> {
    println!("$ {label}");
    let out = cmd.output().with_context(|| format!("running {label}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    if !stdout.ends_with('\n') && !stdout.is_empty() {
        println!();
    }
    if !out.status.success() {
        bail!(
            "{label} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

pub fn run() -> Result<()> {
    let pf = crate::build_pf()?;
    let pf = pf.to_str().context("UTF-8 path")?;
    ensure!(
        crate::setup::is_root(),
        "the demo needs root (it creates network namespaces and loads BPF programs)"
    );
    let _pins = ScratchDir::claim(PIN_DIR);

    show("pf demo: port forwarding in XDP, between three network namespaces");
    println!(
        "internet host {INTERNET_IP} --- {PUBLIC_IFACE} {PUBLIC_IP} [VPN server] tun0 10.8.0.1 --- tunnel client {CLIENT_IP}"
    );
    let topo = Topology::new("pfdemo").context("building the namespaces")?;

    let web_root = ScratchDir::claim(std::env::temp_dir().join("pf-demo-web"));
    std::fs::create_dir_all(web_root.path())?;
    let page = format!("Hello from the tunnel client {CLIENT_IP}, reached through pf.\n");
    std::fs::write(web_root.path().join("index.html"), &page)?;
    let web_root_str = web_root.path().display().to_string();
    topo.client
        .serve_directory(CLIENT_IP, 80, &web_root_str)
        .context("starting the client's web server")?;
    topo.client
        .serve_directory(CLIENT_IP, 8090, &web_root_str)
        .context("starting the client's second web server")?;
    println!(
        "the tunnel client serves a page on {CLIENT_IP}:80 and :8090 (python3 -m http.server)"
    );

    show("on the server: pf serve attaches to the public interface and serves the API");
    let policy = format!(
        "[[interfaces]]\nname = \"{PUBLIC_IFACE}\"\n\n[triggers]\ninterfaces = [\"tun0\"]\n\n\
         [policy]\npublic_ips = [\"{PUBLIC_IP}\"]\n\
         target_networks = [\"10.8.0.0/24\"]\nport_pool = [\"8000-8999\"]\nforbidden_ports = [8022]\n\
         ports_per_owner = 20\n"
    );
    let mut service = Service::start(
        std::path::Path::new(pf),
        ScratchDir::claim(std::env::temp_dir().join("pf-demo-service")),
        std::path::Path::new(PIN_DIR),
        Some(topo.server.path()),
        &policy,
    )
    .context("starting pf serve")?;
    println!("$ cat {}", service.config().display());
    print!("{}", std::fs::read_to_string(service.config())?);
    println!("$ pf serve --config {}", service.config().display());
    print!("{}", service.log());
    let socket = service.socket();
    let socket = socket.to_str().context("UTF-8 path")?;
    let on_server = |args: &[&str]| {
        let mut c = topo
            .server
            .nsenter(&[pf, "--bpffs", PIN_DIR, "--socket", socket]);
        c.args(args);
        c
    };
    let result = (|| -> Result<()> {
        show("on the server: a customer reserves a port (through the service)");
        let public = format!("{PUBLIC_IP}:8080/tcp");
        let target = format!("{CLIENT_IP}:80");
        step(
            &format!("pf reserve {public} --to {target} --owner customer-42 --ttl 1h"),
            &mut on_server(&[
                "reserve",
                &public,
                "--to",
                &target,
                "--owner",
                "customer-42",
                "--ttl",
                "1h",
            ]),
        )?;

        show("on the internet host: connect to the public address");
        let url = format!("http://{PUBLIC_IP}:8080/");
        let body = step(
            &format!("curl {url}"),
            &mut topo
                .inet
                .cmd(&["curl", "--silent", "--fail", "--max-time", "5", &url]),
        )?;
        ensure!(
            body == page,
            "the internet host got {body:?}, not the client's page"
        );

        show("port triggering: a port that opens only when the client itself asks");
        let public = format!("{PUBLIC_IP}:8090/tcp");
        let target = format!("{CLIENT_IP}:8090");
        step(
            &format!(
                "pf trigger {public} --to {target} --on 6000/udp --idle 30s --owner customer-42"
            ),
            &mut on_server(&[
                "trigger",
                &public,
                "--to",
                &target,
                "--on",
                "6000/udp",
                "--idle",
                "30s",
                "--owner",
                "customer-42",
            ]),
        )?;
        let url = format!("http://{PUBLIC_IP}:8090/");
        let curl = |label: &str| {
            println!("$ curl {url}    # {label}");
            topo.inet
                .cmd(&["curl", "--silent", "--fail", "--max-time", "3", &url])
                .output()
                .context("running curl")
        };
        let closed = curl("on the internet host, before the trigger")?;
        ensure!(
            !closed.status.success(),
            "the armed rule's port answered before any trigger"
        );
        println!("(refused: the rule is armed, its port closed)");
        step(
            &format!("echo hi | nc -u -w1 {INTERNET_IP} 6000    # on the tunnel client"),
            &mut topo.client.cmd(&[
                "sh",
                "-c",
                &format!("echo hi | nc -u -w1 {INTERNET_IP} 6000 || true"),
            ]),
        )?;
        let open = curl("on the internet host, after the trigger")?;
        let body = String::from_utf8_lossy(&open.stdout);
        print!("{body}");
        ensure!(
            open.status.success() && body == page,
            "the triggered port did not answer with the client's page"
        );
        step("pf list", &mut on_server(&["list"]))?;

        show("limits: what reaches a reservation, enforced in XDP");
        let public = format!("{PUBLIC_IP}:8081/tcp");
        step(
            &format!(
                "pf reserve {public} --to {CLIENT_IP}:8081 --owner customer-42 --max-pps 1000 --deny {INTERNET_IP}"
            ),
            &mut on_server(&[
                "reserve",
                &public,
                "--to",
                &format!("{CLIENT_IP}:8081"),
                "--owner",
                "customer-42",
                "--max-pps",
                "1000",
                "--deny",
                INTERNET_IP,
            ]),
        )?;
        let url = format!("http://{PUBLIC_IP}:8081/");
        println!("$ curl {url}    # on the internet host, whose address is on the deny-list");
        let denied = topo
            .inet
            .cmd(&["curl", "--silent", "--fail", "--max-time", "2", &url])
            .output()
            .context("running curl")?;
        ensure!(
            !denied.status.success(),
            "a source on the deny-list got through"
        );
        println!("(no answer: its packets were dropped on the public NIC, and counted)");
        let listed = step("pf list", &mut on_server(&["list"]))?;
        ensure!(
            listed.contains("deny 198.51.100.2/32; dropped source"),
            "pf list does not show the deny-list's drops"
        );

        show("on the server: what pf counted");
        step("pf stats", &mut on_server(&["stats"]))?;
        step("pf list", &mut on_server(&["list"]))?;

        show("clean up: stop the service (forwarding goes on without it), then detach");
        service.stop();
        step(
            &format!("pf detach {PUBLIC_IFACE}"),
            &mut on_server(&["detach", PUBLIC_IFACE]),
        )?;
        step(
            "pf detach tun0 --trigger",
            &mut on_server(&["detach", "tun0", "--trigger"]),
        )?;
        Ok(())
    })();
    drop(topo);
    result?;
    println!(
        "\ndemo complete: the request to {PUBLIC_IP}:8080 was answered by the tunnel client; namespaces removed"
    );
    Ok(())
}
