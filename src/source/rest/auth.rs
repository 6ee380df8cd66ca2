//! Request authentication: none, static bearer, API key (header or query), HTTP basic, and
//! OAuth 2.0 client credentials through the token cache.

use reqwest::{RequestBuilder, Url};
use secrecy::ExposeSecret;

use super::token_cache::{Token, TokenCache};
use crate::config::AuthPlan;
use crate::sink::BoxFuture;
use crate::source::SourceError;

/// What a URL shows in logs and errors instead of a secret query value.
pub const REDACTED: &str = "REDACTED";

pub struct Auth {
    plan: AuthPlan,
    tokens: Option<TokenCache>,
}

impl Auth {
    pub fn new(plan: &AuthPlan, http: &reqwest::Client) -> Auth {
        let tokens = match plan {
            AuthPlan::OAuth2(oauth) => Some(TokenCache::new(oauth.clone(), http.clone())),
            _ => None,
        };
        Auth {
            plan: plan.clone(),
            tokens,
        }
    }

    /// The URL to send: with the API key when it goes in the query.
    pub fn url(&self, url: &Url) -> Url {
        let mut url = url.clone();
        if let AuthPlan::ApiKeyQuery { name, key } = &self.plan {
            url.query_pairs_mut().append_pair(name, key.expose_secret());
        }
        url
    }

    /// The URL to show: secret query values (ours, or any the broker put in a link) redacted.
    pub fn shown(&self, url: &Url) -> String {
        let secret_param = match &self.plan {
            AuthPlan::ApiKeyQuery { name, .. } => Some(name.as_str()),
            _ => None,
        };
        let sensitive = |k: &str| {
            Some(k) == secret_param
                || [
                    "token",
                    "access_token",
                    "api_key",
                    "apikey",
                    "key",
                    "secret",
                    "password",
                    "signature",
                ]
                .contains(&k.to_ascii_lowercase().as_str())
        };
        if url.query().is_none() {
            return url.to_string();
        }
        let mut shown = url.clone();
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if sensitive(&k) {
                    REDACTED.into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
        shown.to_string()
    }

    /// `text` (an error body a broker or proxy may have echoed our request into) with every
    /// static secret of this connector replaced by `REDACTED`.
    pub fn scrub(&self, text: String) -> String {
        let secret = match &self.plan {
            AuthPlan::Bearer(token) => Some(token),
            AuthPlan::ApiKeyHeader { key, .. } | AuthPlan::ApiKeyQuery { key, .. } => Some(key),
            AuthPlan::Basic { password, .. } => Some(password),
            AuthPlan::None | AuthPlan::OAuth2(_) => None,
        };
        match secret.map(|s| s.expose_secret()).filter(|s| !s.is_empty()) {
            Some(secret) if text.contains(secret) => text.replace(secret, REDACTED),
            _ => text,
        }
    }

    /// Adds the credentials to a request; returns the OAuth2 token used, if any.
    pub fn apply(
        &self,
        request: RequestBuilder,
    ) -> BoxFuture<'_, Result<(RequestBuilder, Option<Token>), SourceError>> {
        Box::pin(async move {
            Ok(match &self.plan {
                AuthPlan::None | AuthPlan::ApiKeyQuery { .. } => (request, None),
                AuthPlan::Bearer(token) => (request.bearer_auth(token.expose_secret()), None),
                AuthPlan::ApiKeyHeader { name, key } => {
                    (request.header(name, key.expose_secret()), None)
                }
                AuthPlan::Basic { username, password } => (
                    request.basic_auth(username, Some(password.expose_secret())),
                    None,
                ),
                AuthPlan::OAuth2(_) => {
                    let cache = self.tokens.as_ref().expect("oauth2 plan has a token cache");
                    let token = cache.token().await?;
                    (
                        request.bearer_auth(token.secret.expose_secret()),
                        Some(token),
                    )
                }
            })
        })
    }

    /// After a 401: whether asking again with a new token may help (OAuth2 only, once).
    pub fn refused<'a>(&'a self, used: Option<&'a Token>) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match (&self.tokens, used) {
                (Some(cache), Some(token)) => {
                    cache.invalidate(token).await;
                    true
                }
                _ => false,
            }
        })
    }
}
