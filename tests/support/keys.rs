//! A pre-shared key file for the pmigrate processes a test starts: tests
//! run authenticated, as deployments do.
//!
//! ```ignore
//! #[path = "../../tests/support/keys.rs"]
//! mod keys;
//! Command::new(pmigrate).args(["serve", ...]).args(keys::psk_args());
//! ```
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// The key file (32 bytes, mode 0600), written once per test process.
pub fn psk_file() -> PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir().join(format!("pm-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("key dir");
        let path = dir.join("migration.key");
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).expect("key file");
        f.write_all(b"a test key for pmigrate's tests!").expect("key written");
        path
    })
    .clone()
}

/// `--psk-file FILE`, for a pmigrate command line.
pub fn psk_args() -> [String; 2] {
    ["--psk-file".to_string(), psk_file().to_string_lossy().into_owned()]
}

/// The same, as one shell word string for an `exec:` URI.
pub fn psk_shell() -> String {
    format!("--psk-file '{}'", psk_file().display())
}
