//! Each section of the check in a child process of its own (see `SECTIONS`): a kernel fault
//! leaves a CUDA context unusable for good, so it must cost only its own section's rows.

use super::{failed_section, Row};
use std::time::{Duration, Instant};

/// Runs section `name` as a child process of this binary, its output passed through, and
/// returns its rows (see [`run_isolated`]). `model` is handed on as `--model`.
pub fn run_child(
    device: usize,
    name: &str,
    timeout: Duration,
    model: Option<&std::path::Path>,
) -> Vec<Row> {
    let rows_file = std::env::temp_dir().join(format!(
        "kvserve-gpu-check-{}-{}.json",
        std::process::id(),
        name.replace(' ', "-")
    ));
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return vec![failed_section(name, format!("cannot start: {e}"))],
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--device")
        .arg(device.to_string())
        .arg("--section")
        .arg(name)
        .arg("--rows-out")
        .arg(&rows_file);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    run_isolated(cmd, name, &rows_file, timeout)
}

/// Runs `cmd` (section `name`, which writes its rows as JSON to `rows_file`) to its end or
/// until `timeout` (then kills it), and returns the rows it wrote, plus a failed row when it
/// did not exit with success: a signal, an error exit, a kill.
fn run_isolated(
    mut cmd: std::process::Command,
    name: &str,
    rows_file: &std::path::Path,
    timeout: Duration,
) -> Vec<Row> {
    let _ = std::fs::remove_file(rows_file);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return vec![failed_section(name, format!("cannot start: {e}"))],
    };
    let t = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if t.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("killed after {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("wait: {e}")),
        }
    };
    let mut rows: Vec<Row> = std::fs::read(rows_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(rows_file);
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => rows.push(failed_section(
            name,
            format!("the section's process ended: {s}"),
        )),
        Err(e) => rows.push(failed_section(name, e)),
    }
    println!("   [{name}: {:.1} s]", t.elapsed().as_secs_f64());
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str, file: &std::path::Path) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script).arg(file);
        c
    }

    const ROW: &str = r#"[{"name":"x","value":1.5,"unit":"s","pass":null,"note":""}]"#;

    /// A section's rows come back from its process; a process that dies by a signal, exits
    /// with an error or overstays its time adds one failed row, and the rows it wrote before
    /// dying are kept.
    #[test]
    fn isolated_sections_keep_their_rows_and_report_their_end() {
        let dir = std::env::temp_dir().join(format!("gpu-check-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rows.json");
        let t = Duration::from_secs(20);

        let ok = run_isolated(
            sh(&format!("printf '%s' '{ROW}' > \"$0\""), &file),
            "a",
            &file,
            t,
        );
        assert_eq!(ok.len(), 1);
        assert_eq!(
            (ok[0].name.as_str(), ok[0].value, ok[0].pass),
            ("x", 1.5, None)
        );

        let script = format!("printf '%s' '{ROW}' > \"$0\"; kill -SEGV $$");
        let crashed = run_isolated(sh(&script, &file), "b", &file, t);
        assert_eq!(crashed.len(), 2);
        assert_eq!(crashed[0].name, "x");
        assert_eq!(crashed[1].name, "b (section)");
        assert_eq!(crashed[1].pass, Some(false));
        assert!(crashed[1].note.contains("SIGSEGV"), "{}", crashed[1].note);

        // No rows file left over from the last run is read for the next one.
        let failed = run_isolated(sh("exit 3", &file), "c", &file, t);
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].note.contains("exit status: 3"),
            "{}",
            failed[0].note
        );

        let t0 = Instant::now();
        let hung = run_isolated(sh("sleep 30", &file), "d", &file, Duration::from_secs(1));
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(hung.len(), 1);
        assert_eq!(hung[0].note, "killed after 1 s");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
