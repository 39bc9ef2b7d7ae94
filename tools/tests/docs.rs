//! The documentation's one-host command sequences, run as printed: every
//! fenced block whose info string is `sh one-host` in README.md and docs/
//! runs under `bash -e` with the `pmigrate` under test first on `PATH`,
//! and must exit 0 (`wait $!` in a block passes on the status of the
//! server it started).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pmigrate");

/// The `sh one-host` blocks of a Markdown file, with the line each starts on.
fn blocks(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (n, line) in md.lines().enumerate() {
        match &mut cur {
            None if line.trim_start().starts_with("```sh one-host") => cur = Some((n + 1, String::new())),
            None => {}
            Some(_) if line.trim_start().starts_with("```") => out.extend(cur.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    out
}

fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn the_docs_one_host_sequences_run_as_printed() {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut ran = 0;
    for file in doc_files() {
        let md = std::fs::read_to_string(&file).unwrap();
        for (line, body) in blocks(&md) {
            let t = Instant::now();
            let mut child = Command::new("bash")
                .args(["-e", "-c", &body])
                .env("PATH", &path)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(180);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{}:{line}: did not finish in 180 s", file.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}:{line} failed ({}):\n{body}\nstdout:\n{}\nstderr:\n{}",
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("{}:{line}: ran in {:.1} s", file.display(), t.elapsed().as_secs_f64());
            ran += 1;
        }
    }
    assert!(ran >= 2, "the README's one-host sequences were found ({ran})");
}
