//! The agent renewing its own token: when most of the life of the token in `kubernetes.tokenFile`
//! has passed, the agent asks the TokenRequest API, with that same token, for a new one for its
//! own ServiceAccount (the identity's Role allows `create` on `serviceaccounts/token` for the
//! name `cpha` only), and replaces the file atomically. [`TokenFile`](super::TokenFile) reads
//! the new token on the next request, so the member watch goes on with no restart and no gap.
//!
//! Only a token `cpha identity` wrote is renewed, recognised by its claims: a ServiceAccount
//! token of the account `cpha` that is bound to no object. A kubelet-projected token (the
//! DaemonSet's, `inCluster`) is bound to its Pod (`kubernetes.io.pod` in its claims) and is
//! renewed by the kubelet; it, and any token that is not a JWT of that account, is left alone.
//!
//! NOTE: the new token lives as long as the current one did (`exp - iat`), so the lifetime is
//! chosen once, by `cpha identity --duration`, and a server that caps it
//! (`--service-account-max-token-expiration`) shortens every renewal alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::identity::{self, NAME};
use super::{CredentialSource, Credentials, KubeSettings};

/// Renewal starts when this share of the token's life has passed, less up to [`JITTER`], so
/// that hosts given their tokens together do not renew together.
const RENEW_AT: f64 = 0.8;
const JITTER: f64 = 0.1;
/// Retries of a failed renewal start here and double up to [`MAX_BACKOFF`], or a tenth of
/// the token's life when that is shorter.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a token that is not renewed, or not there yet, is looked at again.
const RECHECK: Duration = Duration::from_secs(30);

/// What renewal needs from a token's JWT claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub namespace: String,
    pub service_account: String,
    /// Unix seconds.
    pub issued: i64,
    pub expires: i64,
    /// The object the token is bound to (`pod`, `secret`, `node`), if any.
    pub bound_to: Option<String>,
}

/// The claims of a ServiceAccount token, read without checking its signature (the API does
/// that; the agent only needs to know when to renew), or why the token is not one.
pub fn claims(token: &str) -> Result<Claims, String> {
    let payload = token.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = base64url(payload).ok_or("not a JWT (its payload is not base64url)")?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("not a JWT ({e})"))?;
    let k = &v["kubernetes.io"];
    let (Some(namespace), Some(service_account)) = (k["namespace"].as_str(), k["serviceaccount"]["name"].as_str())
    else {
        return Err("not a ServiceAccount token (no kubernetes.io claims)".into());
    };
    let (Some(issued), Some(expires)) = (v["iat"].as_i64(), v["exp"].as_i64()) else {
        return Err("its claims have no iat or exp".into());
    };
    let bound_to = ["pod", "secret", "node"].into_iter().find(|o| k[o].is_object()).map(str::to_string);
    Ok(Claims { namespace: namespace.into(), service_account: service_account.into(), issued, expires, bound_to })
}

/// Whether the agent renews this token itself, or why not.
pub fn renewable(claims: &Claims) -> Result<(), String> {
    if claims.service_account != NAME {
        return Err(format!(
            "it is a token of ServiceAccount {}/{}, not of the identity `cpha identity` manages",
            claims.namespace, claims.service_account
        ));
    }
    if let Some(object) = &claims.bound_to {
        return Err(format!("it is bound to a {object} (a projected token, renewed by the kubelet)"));
    }
    if claims.expires <= claims.issued {
        return Err("its exp is not after its iat".into());
    }
    Ok(())
}

/// When to renew (Unix seconds): `RENEW_AT` of the life less `jitter` (0..1) × `JITTER`.
pub fn renew_at(claims: &Claims, jitter: f64) -> i64 {
    let life = (claims.expires - claims.issued) as f64;
    claims.issued + (life * (RENEW_AT - JITTER * jitter.clamp(0.0, 1.0))) as i64
}

fn next_backoff(previous: Duration, life: Duration) -> Duration {
    let cap = MAX_BACKOFF.min(life / 10).max(FIRST_BACKOFF);
    (previous * 2).min(cap)
}

fn base64url(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    match getrandom::getrandom(&mut b) {
        Ok(()) => f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    }
}

fn unix_text(t: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn read(path: &Path) -> Result<Claims, String> {
    let token = super::TokenFile::open(path)?.token();
    let claims = claims(&token).map_err(|e| format!("{}: {e}", path.display()))?;
    renewable(&claims).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(claims)
}

/// Whether these credentials are a token file the agent may renew (checked again on every
/// change of the file by [`run`]).
pub fn applies(settings: &KubeSettings) -> Option<PathBuf> {
    match &settings.credentials {
        Credentials::TokenFile { token_file, .. } => Some(token_file.clone()),
        _ => None,
    }
}

/// Renews the token of `kubernetes.tokenFile` before it expires, until `shutdown`. `expiry`
/// is set to the current token's expiry (Unix seconds; 0 while there is no renewable token).
#[tracing::instrument(name = "token renewal", skip_all)]
pub async fn run(
    settings: KubeSettings,
    known: Box<dyn super::KnownServers>,
    expiry: Gauge,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(path) = applies(&settings) else {
        shutdown.cancelled().await;
        return Ok(());
    };
    let mut said: Option<String> = None;
    // The renewal time of the token last read, kept while the file holds that token.
    let mut plan: Option<(Claims, i64)> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if !path.exists() {
            // Not written yet (first boot, before `cpha identity`): the credential wait of the
            // member source says so already.
            expiry.set(0);
            plan = None;
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(settings.poll_interval) => continue,
            }
        }
        let current = match read(&path) {
            Ok(c) => c,
            Err(why) => {
                if said.as_ref() != Some(&why) {
                    tracing::info!("the token is not renewed by cpha: {why}");
                    said = Some(why);
                }
                expiry.set(0);
                plan = None;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(RECHECK.min(settings.poll_interval * 10)) => continue,
                }
            }
        };
        said = None;
        expiry.set(current.expires);
        let at = match &plan {
            Some((c, at)) if *c == current => *at,
            _ => {
                let at = renew_at(&current, jitter());
                tracing::info!(
                    "token for ServiceAccount {}/{NAME} expires at {}; renewing it at {}",
                    current.namespace,
                    unix_text(current.expires),
                    unix_text(at)
                );
                plan = Some((current.clone(), at));
                backoff = FIRST_BACKOFF;
                at
            }
        };
        let now = unix_now();
        if now < at {
            // Woken at least every RECHECK, so a token an admin wrote meanwhile is seen.
            let wait = Duration::from_secs(u64::try_from(at - now).unwrap_or(0)).min(RECHECK);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => continue,
            }
        }
        let life = current.expires - current.issued;
        match renew(&settings, known.as_ref(), &shutdown, &path, &current.namespace, life).await {
            Ok(None) => return Ok(()),
            Ok(Some(new)) => {
                let at = renew_at(&new, jitter());
                tracing::info!(
                    "renewed the token of ServiceAccount {}/{NAME} in {}: expires at {}, next renewal at {}",
                    new.namespace,
                    path.display(),
                    unix_text(new.expires),
                    unix_text(at)
                );
                expiry.set(new.expires);
                // The file now holds `new`: its plan is made, so the next turn logs nothing.
                plan = Some((new, at));
                backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                let expired = if now >= current.expires {
                    " (the token has expired: run `cpha identity` again to issue one with admin credentials)"
                } else {
                    ""
                };
                tracing::error!(
                    "renewing the token in {}: {e:#}{expired}; retrying in {}",
                    path.display(),
                    humantime::format_duration(backoff)
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff, Duration::from_secs(u64::try_from(life).unwrap_or(0)));
            }
        }
    }
}

/// One renewal with the agent's own credentials: `Ok(None)` at shutdown.
async fn renew(
    settings: &KubeSettings,
    known: &dyn super::KnownServers,
    shutdown: &CancellationToken,
    path: &Path,
    namespace: &str,
    seconds: i64,
) -> anyhow::Result<Option<Claims>> {
    let mut source = CredentialSource::new(settings);
    let Some(connected) = super::connect(&mut source, known, shutdown, |_| {}).await? else {
        return Ok(None);
    };
    let (token, _) = identity::issue(&connected.client, namespace, seconds).await?;
    let new = claims(&token).map_err(|e| anyhow::anyhow!("the new token: {e}"))?;
    crate::fsutil::write_atomic(path, format!("{token}\n").as_bytes(), 0o600).with_context(|| {
        format!(
            "writing the new token to {} (its directory must be writable by cpha: systemd/cpha.service makes \
             only /var/lib/cpha so, not /etc/cpha)",
            path.display()
        )
    })?;
    Ok(Some(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = claims.to_string().into_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        format!("eyJhbGciOiJSUzI1NiJ9.{out}.c2ln")
    }

    #[test]
    fn a_cpha_identity_token_is_renewed_and_a_projected_one_is_not() {
        let ours = jwt(serde_json::json!({
            "iat": 1000, "exp": 2000, "sub": "system:serviceaccount:kube-system:cpha",
            "kubernetes.io": {"namespace": "kube-system", "serviceaccount": {"name": "cpha", "uid": "u"}}}));
        let c = claims(&ours).unwrap();
        assert_eq!(
            (c.namespace.as_str(), c.issued, c.expires, c.bound_to.as_deref()),
            ("kube-system", 1000, 2000, None)
        );
        assert_eq!(renewable(&c), Ok(()));
        assert_eq!(renew_at(&c, 0.0), 1800);
        assert_eq!(renew_at(&c, 1.0), 1700);
        assert_eq!(renew_at(&c, 7.0), 1700, "jitter is clamped");

        let projected = jwt(serde_json::json!({
            "iat": 1000, "exp": 4600,
            "kubernetes.io": {"namespace": "kube-system", "serviceaccount": {"name": "cpha", "uid": "u"},
                              "pod": {"name": "cpha-x1", "uid": "p"}}}));
        let why = renewable(&claims(&projected).unwrap()).unwrap_err();
        assert!(why.contains("bound to a pod"), "{why}");
        let other = jwt(serde_json::json!({
            "iat": 1, "exp": 2, "kubernetes.io": {"namespace": "team", "serviceaccount": {"name": "lb"}}}));
        assert!(renewable(&claims(&other).unwrap()).unwrap_err().contains("team/lb"));
        assert_eq!(claims("opaque-static-token").unwrap_err(), "not a JWT");
        assert!(claims("a.b!.c").unwrap_err().contains("base64url"));
    }

    #[test]
    fn retries_back_off_to_a_bound_that_fits_the_lifetime() {
        let day = Duration::from_secs(86_400);
        let mut b = FIRST_BACKOFF;
        let seen: Vec<u64> = (0..8)
            .map(|_| {
                b = next_backoff(b, day);
                b.as_secs()
            })
            .collect();
        assert_eq!(seen, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(next_backoff(Duration::from_secs(2), Duration::from_secs(20)), Duration::from_secs(2));
        assert_eq!(next_backoff(FIRST_BACKOFF, Duration::from_secs(5)), FIRST_BACKOFF);
    }
}
