//! OAuth 2.0 client credentials with the `oauth2` crate, and the caching it leaves to us:
//! one token per connector, refreshed before it expires and once after a 401, with concurrent
//! requests sharing one refresh (the token is behind an async mutex held during the refresh).

use std::time::{Duration, Instant};

use oauth2::basic::BasicClient;
use oauth2::{ClientId, ClientSecret, Scope, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tracing::debug;

use crate::config::plan::OAuth2Plan;
use crate::source::SourceError;

/// When a token server gives no lifetime, assume this one.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(60);
/// Refresh this long before expiry at most (less for short-lived tokens).
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// A token handed out, with the generation that tells a stale one from a fresh one.
#[derive(Clone)]
pub struct Token {
    pub secret: SecretString,
    pub generation: u64,
}

struct Cached {
    token: Token,
    refresh_at: Instant,
}

pub struct TokenCache {
    plan: OAuth2Plan,
    http: reqwest::Client,
    state: Mutex<Option<Cached>>,
    generations: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl TokenCache {
    pub fn new(plan: OAuth2Plan, http: reqwest::Client) -> Self {
        TokenCache {
            plan,
            http,
            state: Mutex::new(None),
            generations: Default::default(),
        }
    }

    /// A valid token: the cached one, or a new one when it is near expiry.
    pub async fn token(&self) -> Result<Token, SourceError> {
        let mut state = self.state.lock().await;
        if let Some(cached) = state.as_ref()
            && Instant::now() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *state = Some(fresh);
        Ok(token)
    }

    /// Forgets `used` after the API refused it (a 401), unless it was replaced already.
    pub async fn invalidate(&self, used: &Token) {
        let mut state = self.state.lock().await;
        if state
            .as_ref()
            .is_some_and(|c| c.token.generation == used.generation)
        {
            *state = None;
        }
    }

    async fn fetch(&self) -> Result<Cached, SourceError> {
        let url = self.plan.token_url.to_string();
        let client = BasicClient::new(ClientId::new(self.plan.client_id.clone()))
            .set_client_secret(ClientSecret::new(
                self.plan.client_secret.expose_secret().to_owned(),
            ))
            .set_token_uri(TokenUrl::from_url(self.plan.token_url.clone()));
        // The adapter owns its client handle (an `Arc` inside): a closure borrowing `self` would
        // make the token future's `Send` bound unprovable for the compiler.
        let http = self.http.clone();
        let send = move |request: oauth2::HttpRequest| {
            let http = http.clone();
            async move { exchange(&http, request).await }
        };
        let started = Instant::now();
        let response = client
            .exchange_client_credentials()
            .add_scopes(self.plan.scopes.iter().cloned().map(Scope::new))
            .request_async(&send)
            .await
            .map_err(|e| token_error(&url, e))?;
        let lifetime = response.expires_in().unwrap_or(ASSUMED_LIFETIME);
        let margin = REFRESH_MARGIN.min(lifetime / 5);
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        debug!(
            lifetime_s = lifetime.as_secs(),
            generation, "OAuth2 token obtained."
        );
        Ok(Cached {
            token: Token {
                secret: SecretString::from(response.access_token().secret().to_owned()),
                generation,
            },
            refresh_at: started + lifetime.saturating_sub(margin),
        })
    }
}

/// Sends one token request with the connector's HTTP client: the `oauth2` crate's own client
/// is for reqwest 0.12, and a second HTTP stack is not worth 20 lines.
async fn exchange(
    http: &reqwest::Client,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, TransportError> {
    let failed = |e: &dyn std::fmt::Display| TransportError(e.to_string());
    let request = reqwest::Request::try_from(request).map_err(|e| failed(&e))?;
    let response = http.execute(request).await.map_err(|e| failed(&e))?;
    let mut builder = oauth2::http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    // A token answer is a few hundred bytes; the endpoint is the broker's, and not trusted
    // to stop sending (or not to gzip a bomb).
    const LONGEST_TOKEN_ANSWER: usize = 1024 * 1024;
    let body = super::client::read_capped(response, LONGEST_TOKEN_ANSWER)
        .await
        .map_err(|e| match e {
            super::client::Capped::Transport(e) => failed(&e),
            super::client::Capped::Over => {
                TransportError("the token endpoint's answer is over 1 MiB".into())
            }
        })?;
    builder.body(body).map_err(|e| failed(&e))
}

/// The token endpoint's refusal, without the secret: a 4xx is final, the rest may pass.
fn token_error<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
    url: &str,
    error: oauth2::RequestTokenError<RE, T>,
) -> SourceError {
    use oauth2::RequestTokenError as E;
    match error {
        E::ServerResponse(response) => SourceError::Auth {
            url: url.to_owned(),
            message: format!("token endpoint refused the client credentials: {response}"),
        },
        E::Request(e) => SourceError::Transport {
            url: url.to_owned(),
            message: format!("token request failed: {e}"),
        },
        E::Parse(e, _) => SourceError::Transport {
            url: url.to_owned(),
            message: format!("token response unreadable: {e}"),
        },
        E::Other(message) => SourceError::Transport {
            url: url.to_owned(),
            message,
        },
    }
}
