"""The sandbox's two HTML pages: TikTok's error page and the consent page.

Self-contained (inline CSS, no external assets) and autoescaped by Tornado's
template engine, because every value shown comes from the query string.
"""

from __future__ import annotations

from tornado.template import Template

_STYLE = """
body { font-family: system-ui, sans-serif; background: #f1f1f2; margin: 0; }
main { max-width: 26rem; margin: 3rem auto; background: #fff; border-radius: 12px;
       padding: 1.5rem 2rem; box-shadow: 0 2px 12px rgba(0,0,0,.08); }
h1 { font-size: 1.25rem; margin: 0 0 .5rem; }
.badge { display: inline-block; font-size: .7rem; background: #fe2c55; color: #fff;
         border-radius: 4px; padding: .1rem .4rem; letter-spacing: .05em; }
ul { padding-left: 1.2rem; } li { margin: .4rem 0; } code { font-size: .85em; color: #555; }
.buttons { display: flex; gap: .75rem; margin-top: 1.25rem; }
button { flex: 1; font-size: 1rem; padding: .65rem; border-radius: 6px; cursor: pointer;
         border: 1px solid #ccc; background: #fff; }
button.approve { background: #fe2c55; border-color: #fe2c55; color: #fff; }
.error { color: #b00020; }
"""

ERROR_PAGE = Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TikTok sandbox: error</title>
<style>{% raw style %}</style></head>
<body><main>
<span class="badge">SANDBOX</span>
<h1>Something went wrong</h1>
<p class="error"><strong>{{ error }}</strong>: {{ description }}</p>
<p>The app that sent you here is misconfigured. TikTok shows this page instead of
redirecting back to the app.</p>
</main></body></html>
"""
)

CONSENT_PAGE = Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Authorize {{ app_name }}</title>
<style>{% raw style %}</style></head>
<body><main>
<span class="badge">SANDBOX</span>
<h1>{{ app_name }} would like to access your TikTok account</h1>
<p>Signed in as <strong>{{ display_name }}</strong></p>
<p>This will allow {{ app_name }} to:</p>
<ul>
{% for scope, description in scopes %}  <li>{{ description }} <code>{{ scope }}</code></li>
{% end %}</ul>
<form method="post" action="{{ action }}">
{% for name, value in hidden %}  <input type="hidden" name="{{ name }}" value="{{ value }}">
{% end %}  <div class="buttons">
    <button type="submit" name="sandbox_decision" value="deny">Deny</button>
    <button type="submit" name="sandbox_decision" value="approve" class="approve">Approve</button>
  </div>
</form>
</main></body></html>
"""
)


def render_error(error: str, description: str) -> bytes:
    return ERROR_PAGE.generate(style=_STYLE, error=error, description=description)


def render_consent(
    *,
    app_name: str,
    display_name: str,
    scopes: list[tuple[str, str]],
    hidden: list[tuple[str, str]],
    action: str,
) -> bytes:
    return CONSENT_PAGE.generate(
        style=_STYLE,
        app_name=app_name,
        display_name=display_name,
        scopes=scopes,
        hidden=hidden,
        action=action,
    )
