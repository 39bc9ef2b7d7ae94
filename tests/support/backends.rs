//! One suite, every I/O backend: a test file that includes this writes its
//! cases as `fn case(io: BackendChoice)` and lists them in
//! `over_each_backend!`, which makes a `case::portable` and a
//! `case::io_uring` test of each. The io_uring ones skip, saying why, where
//! the kernel refuses io_uring.
//!
//! ```ignore
//! #[macro_use]
//! #[path = "support/backends.rs"]
//! mod backends;
//! ```

/// Makes a test per backend of each listed case.
macro_rules! over_each_backend {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn portable() {
                super::$case(pmigrate::BackendChoice::Portable);
            }

            #[test]
            fn io_uring() {
                match pmigrate_transport::backend::probe_uring() {
                    Ok(_) => super::$case(pmigrate::BackendChoice::Uring),
                    Err(why) => eprintln!("skipping {} over io_uring: {why}", stringify!($case)),
                }
            }
        }
    )*};
}

/// Engine settings for a case: the defaults, over `io`.
pub fn config(io: pmigrate::BackendChoice) -> pmigrate::SourceConfig {
    pmigrate::SourceConfig { io, ..pmigrate::SourceConfig::default() }
}

/// Destination options for a case: the defaults, over `io`.
pub fn receive_options(io: pmigrate::BackendChoice) -> pmigrate::ReceiveOptions {
    pmigrate::ReceiveOptions { io, ..pmigrate::ReceiveOptions::default() }
}

/// The key both ends of a test session hold: tests run authenticated, as
/// deployments do.
pub fn key() -> pmigrate::Auth {
    pmigrate::Auth::Psk(pmigrate::Psk::from_bytes(b"pmigrate test key, 32 bytes long").expect("a valid key"))
}
