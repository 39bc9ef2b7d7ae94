//! The authentication flags every command shares, and `pmigrate keygen`.
//!
//! Secure by default: a command that listens or connects refuses to start
//! without a pre-shared key or mutual TLS, unless `--insecure` says the
//! operator means it (then one warning line).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use pmigrate::TlsConfig;
use pmigrate::{Auth, Psk};

/// How this end and its peers prove who they are: a pre-shared key, mutual
/// TLS, or (`--insecure`) nothing.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct AuthArgs {
    /// Pre-shared key file: at least 32 bytes of secret, readable by its
    /// owner only (`pmigrate keygen FILE` writes one; so does
    /// `head -c 32 /dev/urandom > FILE`). Both ends give the same key.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_cert", "insecure"])]
    pub(crate) psk_file: Option<PathBuf>,
    /// This end's certificate chain (PEM), leaf first: mutual TLS 1.3 over
    /// every stream, with --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], conflicts_with = "insecure")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// This end's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub(crate) tls_key: Option<PathBuf>,
    /// The CA (PEM) the other end's certificate must chain to.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub(crate) tls_ca: Option<PathBuf>,
    /// The name the other end's certificate must carry (connecting ends;
    /// default: the address dialled).
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_name: Option<String>,
    /// Run without authentication: anyone who can reach the port can take
    /// part (write the VM's memory, or read it on the way). Only for a
    /// network nobody else can reach.
    #[arg(long)]
    pub(crate) insecure: bool,
}

impl AuthArgs {
    /// The authentication these flags ask for; `who` names the command in
    /// the refusal or the warning.
    pub(crate) fn auth(&self, who: &str) -> Result<Auth> {
        if let Some(p) = &self.psk_file {
            return Ok(Auth::Psk(Psk::from_file(p)?));
        }
        if let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            let mut cfg = TlsConfig::from_pem_files(cert, key, ca)?;
            cfg.peer_name = self.tls_name.clone();
            return Ok(Auth::Tls(Arc::new(cfg)));
        }
        if self.insecure {
            say!("pmigrate {who}: warning: --insecure: no authentication, anyone who can reach the port can take part");
            return Ok(Auth::Insecure);
        }
        bail!(
            "no authentication given: use --psk-file FILE (`pmigrate keygen FILE` writes one) or \
             --tls-cert/--tls-key/--tls-ca on both ends, or --insecure on a network nobody else can reach"
        )
    }

    /// The same flags, as words for another pmigrate command line (the
    /// helpers `pmigrate qemu` has QEMU start). Paths are made absolute:
    /// the helper may run elsewhere.
    pub(crate) fn to_args(&self) -> Result<Vec<String>> {
        let abs = |p: &PathBuf| -> Result<String> {
            Ok(std::path::absolute(p).with_context(|| format!("{}", p.display()))?.to_string_lossy().into_owned())
        };
        let mut v = Vec::new();
        if let Some(p) = &self.psk_file {
            v.extend(["--psk-file".to_string(), abs(p)?]);
        }
        for (flag, p) in [("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key), ("--tls-ca", &self.tls_ca)] {
            if let Some(p) = p {
                v.extend([flag.to_string(), abs(p)?]);
            }
        }
        if let Some(n) = &self.tls_name {
            v.extend(["--tls-name".to_string(), n.clone()]);
        }
        if self.insecure {
            v.push("--insecure".into());
        }
        Ok(v)
    }
}

/// `pmigrate keygen FILE`: writes a fresh 32-byte key, mode 0600, to a new
/// file (an existing one is never overwritten).
#[derive(Args)]
pub(crate) struct KeygenArgs {
    /// Where to write the key.
    file: PathBuf,
}

pub(crate) fn keygen(a: KeygenArgs) -> Result<()> {
    Psk::write_new_file(&a.file)?;
    say!("pmigrate keygen: wrote a 32-byte key to {} (mode 0600); copy it to the other host", a.file.display());
    Ok(())
}
