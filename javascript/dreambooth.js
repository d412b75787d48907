// Dreambooth tab: tooltips from the settings schema's help texts, and a progress indicator in the page
// title that keeps working across tab switches and reloads. Loaded by A1111/Forge/SD.Next from the
// extension's javascript/ folder, and injected by the standalone app. Touches only #dreambooth_tab.
(function () {
    "use strict";
    if (window.dreamboothTabScript) {
        return; // loaded twice (host + injected): keep one instance
    }
    window.dreamboothTabScript = true;

    function root() {
        var app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }

    function helpTexts() {
        var holder = root().querySelector("#db_help_data");
        if (!holder) {
            return null;
        }
        try {
            return JSON.parse(holder.getAttribute("data-help") || "{}");
        } catch (error) {
            return null;
        }
    }

    // Put each setting's help text on its label (and the control) as a native tooltip.
    function applyTooltips(texts) {
        var applied = 0;
        Object.keys(texts).forEach(function (elemId) {
            var element = root().querySelector("#" + elemId);
            if (!element || element.getAttribute("data-db-help") === "1") {
                return;
            }
            var help = texts[elemId].help;
            element.setAttribute("title", help);
            element.querySelectorAll("label, span, input, textarea, select, button").forEach(function (child) {
                child.setAttribute("title", help);
            });
            element.setAttribute("data-db-help", "1");
            element.classList.add("db-has-help");
            applied += 1;
        });
        return applied;
    }

    var baseTitle = document.title;

    // Mirror the run's progress (rendered by the server's poll into #db_progress) in the page title, so it
    // shows while another web UI tab is open; the server resumes polling on every page load.
    function updateTitle() {
        var bar = root().querySelector("#dreambooth_tab .db-progress");
        if (!bar) {
            return;
        }
        var state = bar.getAttribute("data-state");
        if (state === "running" || state === "stopping") {
            document.title = "[" + Math.round(parseFloat(bar.getAttribute("data-percent") || "0")) + "%] " + baseTitle;
        } else if (document.title !== baseTitle) {
            document.title = baseTitle;
        }
    }

    function tick() {
        var texts = helpTexts();
        if (texts) {
            applyTooltips(texts);
        }
        updateTitle();
    }

    // Components are rendered late and re-rendered on tab switches: re-apply on DOM changes, throttled.
    var pending = false;
    function schedule() {
        if (pending) {
            return;
        }
        pending = true;
        setTimeout(function () {
            pending = false;
            tick();
        }, 300);
    }

    function start() {
        new MutationObserver(schedule).observe(root() === document ? document.body : root(), {
            childList: true, subtree: true, attributes: true, attributeFilter: ["data-percent"]
        });
        setInterval(tick, 2000);
        tick();
    }

    if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start();
    }
})();
