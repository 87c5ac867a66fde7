"""Whose conversations the page shows: a signed-in person's, else this browser's.

Without sign-in every browser is an anonymous owner: a random 256-bit token, made on
its first visit and kept in a cookie for a year. The sidebar lists that owner's
conversations only, and a conversation link (an unguessable id) opens only for its
owner; another browser, or a private window, starts empty.

When ``[auth]`` is set in ``.streamlit/secrets.toml``, people can sign in with
OpenID Connect (Streamlit's ``st.login``); signed in, their conversations are kept
under their identity (issuer and subject), so they follow them to any browser, and
signing out hides them again.
"""

from __future__ import annotations

import re
import secrets

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

COOKIE = "chatbot_owner"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32)
_YEAR_S = 365 * 24 * 3600


def sign_in_configured() -> bool:
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, StreamlitSecretNotFoundError):
        return False


def signed_in() -> bool:
    return sign_in_configured() and bool(st.user.is_logged_in)


def current_owner() -> str:
    """The owner of what this page shows and writes."""
    if signed_in():
        return f"user:{st.user.get('iss', '')}:{st.user.get('sub', '')}"
    return f"browser:{_browser_token()}"


def _browser_token() -> str:
    """This browser's token: from its cookie, or new (and then given to the browser)."""
    if "owner_token" not in st.session_state:
        token = st.context.cookies.get(COOKIE)
        if not (isinstance(token, str) and _TOKEN.fullmatch(token)):
            token = secrets.token_urlsafe(32)
            # Streamlit cannot set cookies itself; the page's own script can.
            st.html(
                f"<script>document.cookie = '{COOKIE}={token}; path=/; "
                f"max-age={_YEAR_S}; SameSite=Strict';</script>",
                unsafe_allow_javascript=True,
            )
        st.session_state.owner_token = token
    return str(st.session_state.owner_token)
