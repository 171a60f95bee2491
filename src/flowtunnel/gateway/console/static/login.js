// The login page: shows the refusal message after a wrong token (the server never reflects input).
"use strict";
if (new URLSearchParams(window.location.search).get("denied") === "1") {
  document.getElementById("denied").hidden = false;
}
