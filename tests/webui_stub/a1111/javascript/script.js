// Mirrors the WebUI's script.js helpers that extension scripts use: gradioApp(), onUiLoaded(cb), onUiUpdate(cb).
// onUiLoaded callbacks run once when the tabs exist; onUiUpdate callbacks on every DOM mutation.
var uiLoadedCallbacks = [];
var uiUpdateCallbacks = [];
function gradioApp() {
    const elems = document.getElementsByTagName("gradio-app");
    const elem = elems.length == 0 ? document : elems[0];
    return elem.shadowRoot ? elem.shadowRoot : elem;
}
function onUiLoaded(callback) { uiLoadedCallbacks.push(callback); }
function onUiUpdate(callback) { uiUpdateCallbacks.push(callback); }
function executeCallbacks(queue, arg) { for (const callback of queue) { try { callback(arg); } catch (e) { console.error(e); } } }
var executedOnLoaded = false;
document.addEventListener("DOMContentLoaded", function() {
    var mutationObserver = new MutationObserver(function(m) {
        if (!executedOnLoaded && gradioApp().querySelector("#tabs")) {
            executedOnLoaded = true;
            executeCallbacks(uiLoadedCallbacks);
        }
        executeCallbacks(uiUpdateCallbacks, m);
    });
    mutationObserver.observe(gradioApp(), {childList: true, subtree: true});
});
