"""The sandbox's two HTML pages: TikTok's error page and the consent page.

Self-contained (inline CSS, no external assets) and autoescaped by Tornado's
template engine, because every value shown comes from the query string.
"""

from __future__ import annotations

from tornado.template import Template

_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #161823; background: #f1f1f2; margin: 0; }
main { max-width: 26rem; margin: 3rem auto; background: #fff; border-radius: 12px;
       padding: 1.5rem 2rem; box-shadow: 0 2px 12px rgba(0,0,0,.08); }
.apps { display: flex; align-items: center; justify-content: center; gap: .6rem;
        margin: .75rem 0 1rem; }
.icon { width: 3rem; height: 3rem; border-radius: 12px; display: grid; place-items: center;
        font-weight: 800; font-size: 1.3rem; color: #fff; background: #4f46e5; }
.icon.tiktok { background: #000; text-shadow: -2px -1px 0 #25f4ee, 2px 1px 0 #fe2c55; }
.dots { color: #bbb; letter-spacing: .2em; }
ul.scopes { list-style: none; padding: 0; margin: .5rem 0; border: 1px solid #eee;
            border-radius: 8px; }
ul.scopes li { margin: 0; padding: .6rem .8rem; border-top: 1px solid #eee; }
ul.scopes li:first-child { border-top: 0; }
ul.scopes li::before { content: "\\2713"; color: #0f7b4a; font-weight: 700; margin-right: .5rem; }
ul.scopes code { display: block; margin-left: 1.4rem; }
.note { color: #6b6d76; font-size: .8rem; margin: 1rem 0 0; }
h1 { font-size: 1.25rem; margin: 0 0 .5rem; }
.badge { display: inline-block; font-size: .7rem; background: #fe2c55; color: #fff;
         border-radius: 4px; padding: .1rem .4rem; letter-spacing: .05em; }
ul { padding-left: 1.2rem; } li { margin: .4rem 0; } code { font-size: .85em; color: #555; }
.buttons { display: flex; gap: .75rem; margin-top: 1.25rem; }
button { flex: 1; font: inherit; font-weight: 600; padding: .65rem; border-radius: 6px;
         cursor: pointer; border: 1px solid #ccc; background: #fff; }
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
<div class="apps"><span class="icon">{{ app_name[:1].upper() }}</span>
  <span class="dots">&middot;&middot;&middot;</span><span class="icon tiktok">&#9834;</span></div>
<h1>{{ app_name }} would like to access your TikTok account</h1>
<p>Signed in as <strong>{{ display_name }}</strong></p>
<p>This will allow {{ app_name }} to:</p>
<ul class="scopes">
{% for scope, description in scopes %}  <li>{{ description }} <code>{{ scope }}</code></li>
{% end %}</ul>
<form method="post" action="{{ action }}">
{% for name, value in hidden %}  <input type="hidden" name="{{ name }}" value="{{ value }}">
{% end %}  <div class="buttons">
    <button type="submit" name="sandbox_decision" value="deny">Deny</button>
    <button type="submit" name="sandbox_decision" value="approve" class="approve">Approve</button>
  </div>
</form>
<p class="note">You can remove {{ app_name }}'s access at any time in TikTok's settings.</p>
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
