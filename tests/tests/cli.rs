//! Command-line behaviour of both binaries: exit codes and the messages an operator reads.
//! Each test owns a temp directory; a failing assertion prints the command, its exit status,
//! stdout and stderr.

use std::path::Path;
use std::process::{Command, Output};

use runnel_tests::{AgentOptions, TestDir, Uplink, agent_config, binaries};

/// Runs a command to completion; returns its output and a description for assertion messages.
fn run(program: &Path, args: &[&str]) -> (Output, String) {
    let output = Command::new(program)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|error| panic!("run {} {}: {error}", program.display(), args.join(" ")));
    let description = format!(
        "command: {} {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        program.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, description)
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `certs init` and `issue-agent` through the CLI, as an operator would run them.
fn cli_certs(dir: &TestDir) -> runnel_tests::AgentCert {
    let bins = binaries!();
    let certs_dir = dir.join("certs");
    let (output, description) = run(
        &bins.aggregator,
        &["certs", "init", "--dir", path_arg(&certs_dir)],
    );
    assert!(output.status.success(), "{description}");
    let (output, description) = run(
        &bins.aggregator,
        &[
            "certs",
            "issue-agent",
            "--dir",
            path_arg(&certs_dir),
            "--name",
            "shop-7",
        ],
    );
    assert!(output.status.success(), "{description}");
    let cert = certs_dir.join("shop-7.pem");
    let key = certs_dir.join("shop-7.key");
    assert!(
        cert.exists() && key.exists(),
        "issue-agent did not write {} and {}\n{description}",
        cert.display(),
        key.display()
    );
    runnel_tests::AgentCert {
        name: "shop-7".to_owned(),
        cert,
        key,
    }
}

#[test]
fn agent_check_accepts_a_good_config_and_prints_the_agent_id() {
    let bins = binaries!();
    let dir = TestDir::new("cli-check-good");
    let cert = cli_certs(&dir);
    let uplink = Uplink {
        aggregator: ([127, 0, 0, 1], 9480).into(),
        ca_cert: dir.join("certs").join("ca.pem"),
    };
    let config_path = dir.join("agent.toml");
    std::fs::write(
        &config_path,
        agent_config(&dir.join("data"), &cert, &uplink, &AgentOptions::default()),
    )
    .expect("write config");

    let (output, description) = run(&bins.agent, &["check", "--config", path_arg(&config_path)]);
    assert!(output.status.success(), "{description}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("shop-7"),
        "check does not print the agent id\n{description}"
    );
}

#[test]
fn agent_check_names_an_unknown_key() {
    let bins = binaries!();
    let dir = TestDir::new("cli-check-unknown-key");
    let cert = cli_certs(&dir);
    let uplink = Uplink {
        aggregator: ([127, 0, 0, 1], 9480).into(),
        ca_cert: dir.join("certs").join("ca.pem"),
    };
    let mut config = agent_config(&dir.join("data"), &cert, &uplink, &AgentOptions::default());
    config = config.replace("[buffer]\n", "[buffer]\nmax_byts = 2000000\n");
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config).expect("write config");

    let (output, description) = run(&bins.agent, &["check", "--config", path_arg(&config_path)]);
    assert!(!output.status.success(), "{description}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("max_byts"),
        "stderr does not name the unknown key\n{description}"
    );
    assert!(
        stderr.contains("agent.toml"),
        "stderr does not name the file\n{description}"
    );
}

#[test]
fn agent_check_reports_a_missing_certificate() {
    let bins = binaries!();
    let dir = TestDir::new("cli-check-missing-cert");
    let mut cert = cli_certs(&dir);
    cert.cert = dir.join("certs").join("no-such.pem");
    let uplink = Uplink {
        aggregator: ([127, 0, 0, 1], 9480).into(),
        ca_cert: dir.join("certs").join("ca.pem"),
    };
    let config_path = dir.join("agent.toml");
    std::fs::write(
        &config_path,
        agent_config(&dir.join("data"), &cert, &uplink, &AgentOptions::default()),
    )
    .expect("write config");

    let (output, description) = run(&bins.agent, &["check", "--config", path_arg(&config_path)]);
    assert!(!output.status.success(), "{description}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no-such.pem"),
        "stderr does not name the missing file\n{description}"
    );
}

#[test]
fn certs_init_refuses_to_replace_a_ca_without_force() {
    let bins = binaries!();
    let dir = TestDir::new("cli-certs-init-twice");
    let certs_dir = dir.join("certs");
    let args = ["certs", "init", "--dir", path_arg(&certs_dir)];
    let (output, description) = run(&bins.aggregator, &args);
    assert!(output.status.success(), "{description}");
    let ca_before = std::fs::read(certs_dir.join("ca.pem")).expect("read ca.pem");

    let (output, description) = run(&bins.aggregator, &args);
    assert!(
        !output.status.success(),
        "second init without --force succeeded\n{description}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--force"),
        "stderr does not mention --force\n{description}"
    );
    let ca_after = std::fs::read(certs_dir.join("ca.pem")).expect("read ca.pem");
    assert_eq!(ca_before, ca_after, "a refused init changed the CA");

    let (output, description) = run(
        &bins.aggregator,
        &["certs", "init", "--dir", path_arg(&certs_dir), "--force"],
    );
    assert!(output.status.success(), "{description}");
    let ca_forced = std::fs::read(certs_dir.join("ca.pem")).expect("read ca.pem");
    assert_ne!(ca_before, ca_forced, "init --force did not replace the CA");
}
