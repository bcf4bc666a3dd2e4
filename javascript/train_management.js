// Train Management: the tab's page script, for the WebUI (which loads every javascript/*.js) and the standalone app
// (whose page runs this file from the tab's load event). A classic script: every global is prefixed.
//  - Lora cards: when the tab's delivery stamp (#train_management_delivery_stamp, hidden by style.css) shows a new
//    delivery, the hidden refresh buttons of the txt2img/img2img Lora cards are clicked, as the WebUI's own
//    refresh does (no API call, so --api-auth does not get in the way).
//  - Drafts: what the config editor holds is kept in the browser per FM type (localStorage) as it is typed or
//    filled, and put back when the page is loaded again; switching the FM type shows that type's draft.
//  - Keyboard: each row of the Trainings List is one tab stop (not each cell); Enter or Space opens the job.
//  - Send to txt2img: puts a LoRA's <lora:name:weight> into the txt2img prompt and shows txt2img.

var trainManagementStampId = "train_management_delivery_stamp";
var trainManagementRefreshIds = ["txt2img_lora_extra_refresh_internal", "img2img_lora_extra_refresh_internal"];
var trainManagementLastStamp = null;
var trainManagementStarted = false;
var trainManagementFmTypes = {"SD 1.5": "sd_1_5", "SDXL": "sd_xl"};

function trainManagementRoot() {
    return typeof gradioApp === "function" ? gradioApp() : document;
}

function trainManagementQuery(selector) {
    return trainManagementRoot().querySelector(selector);
}

// -- Lora cards ------------------------------------------------------------------------------------------------

function trainManagementStampText() {
    // Only the HTML value (gradio's .prose element): the block around it also holds gradio's progress timer,
    // whose text changes at every refresh. gradio 3 puts the id on both, gradio 4 on the block only.
    var id = "#" + trainManagementStampId;
    var stamp = trainManagementQuery(id + ".prose, " + id + " .prose");
    return stamp ? stamp.textContent.trim() : null;
}

function trainManagementRefreshLoraCards() {
    trainManagementRefreshIds.forEach(function(id) {
        var button = trainManagementQuery("#" + id);
        if (button) {
            button.click();
        }
    });
}

function trainManagementCheckStamp() {
    var text = trainManagementStampText();
    if (text === null) {
        return;
    }
    if (trainManagementLastStamp === null) {
        trainManagementLastStamp = text; // what the page showed when it loaded: the cards list that already
        return;
    }
    if (text !== trainManagementLastStamp) {
        trainManagementLastStamp = text;
        if (text) {
            trainManagementRefreshLoraCards();
        }
    }
}

// -- drafts ----------------------------------------------------------------------------------------------------

function trainManagementDraftKey(fmType) {
    return "train_management_draft_" + fmType;
}

function trainManagementReadDraft(fmType) {
    try {
        return window.localStorage.getItem(trainManagementDraftKey(fmType));
    } catch (error) { // storage disabled: no drafts
        return null;
    }
}

function trainManagementWriteDraft(fmType, text) {
    try {
        window.localStorage.setItem(trainManagementDraftKey(fmType), text);
    } catch (error) {
        // storage disabled or full: the editor still works, without drafts
    }
}

function trainManagementCurrentFm() {
    var checked = trainManagementQuery("#train_management_fm_type input:checked");
    return checked ? (trainManagementFmTypes[checked.value] || checked.value) : null;
}

function trainManagementEditor() {
    return trainManagementQuery("#train_management_config textarea");
}

function trainManagementStoreDraft(record) {
    // The tab's fills (defaults, presets, Duplicate, FM switch) send {"fm": fm_type, "text": ...}.
    try {
        var fill = JSON.parse(record);
        if (fill && fill.fm && typeof fill.text === "string") {
            trainManagementWriteDraft(fill.fm, fill.text);
        }
    } catch (error) {
        // an empty or foreign value: nothing to keep
    }
    return [];
}

function trainManagementDraftFor(fm, text, last, instance) {
    // The FM Type's input event: the Python side gets the new type's draft ("" when it has none) for the editor.
    var draft = trainManagementReadDraft(trainManagementFmTypes[fm] || fm);
    return [fm, draft === null ? "" : draft, last, instance];
}

function trainManagementRestoreDraft() {
    var editor = trainManagementEditor();
    var fm = trainManagementCurrentFm();
    if (!editor || !fm) {
        return false;
    }
    var draft = trainManagementReadDraft(fm);
    if (draft !== null && draft !== editor.value) {
        editor.value = draft;
        editor.dispatchEvent(new Event("input", {bubbles: true}));
    }
    return true;
}

function trainManagementOnInput(event) {
    var target = event.target;
    if (!target || !target.closest || !target.closest("#train_management_config")) {
        return;
    }
    var fm = trainManagementCurrentFm();
    if (fm) {
        trainManagementWriteDraft(fm, target.value);
    }
}

// -- keyboard: one tab stop per row ----------------------------------------------------------------------------

function trainManagementRowKey(event) {
    if (event.key !== "Enter" && event.key !== " ") {
        return;
    }
    event.preventDefault();
    var cell = event.currentTarget.querySelector("td");
    if (cell) {
        cell.click(); // gradio's select event: the row's job is opened
    }
}

function trainManagementKeyboardRows() {
    var table = trainManagementQuery("#train_management_jobs table");
    if (!table) {
        return;
    }
    table.querySelectorAll("td, th, td *, th *").forEach(function(node) {
        if (node.tabIndex >= 0) {
            node.tabIndex = -1;
        }
    });
    table.querySelectorAll("tbody tr").forEach(function(row) {
        row.tabIndex = 0;
        if (!row.dataset.trainManagementKeys) {
            row.dataset.trainManagementKeys = "1";
            row.addEventListener("keydown", trainManagementRowKey);
        }
    });
}

// -- Send to txt2img -------------------------------------------------------------------------------------------

function trainManagementSendToTxt2img(prompt) {
    if (!prompt) {
        return [];
    }
    var box = trainManagementQuery("#txt2img_prompt textarea");
    if (box) {
        var before = box.value.replace(/\s+$/, "");
        box.value = before ? before + " " + prompt : prompt;
        box.dispatchEvent(new Event("input", {bubbles: true}));
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    } else {
        var tabs = trainManagementRoot().querySelectorAll("#tabs button");
        for (var i = 0; i < tabs.length; i++) {
            if (tabs[i].textContent.trim() === "txt2img") {
                tabs[i].click();
                break;
            }
        }
    }
    return [];
}

// -- start -----------------------------------------------------------------------------------------------------

function trainManagementOnChange() {
    trainManagementCheckStamp();
    trainManagementKeyboardRows();
}

function trainManagementStart() {
    if (trainManagementStarted) {
        return;
    }
    trainManagementStarted = true;
    trainManagementRoot().addEventListener("input", trainManagementOnInput, true);
    var tries = 0;
    var restore = window.setInterval(function() { // the editor may be rendered a moment later
        tries += 1;
        if (trainManagementRestoreDraft() || tries > 120) {
            window.clearInterval(restore);
        }
    }, 250);
    trainManagementOnChange();
    if (typeof onAfterUiUpdate === "function") { // the WebUI: once after a burst of DOM changes
        onAfterUiUpdate(trainManagementOnChange);
    } else if (typeof onUiUpdate === "function") {
        onUiUpdate(trainManagementOnChange);
    } else { // the standalone page
        var pending = false;
        new MutationObserver(function() {
            if (!pending) {
                pending = true;
                window.setTimeout(function() {
                    pending = false;
                    trainManagementOnChange();
                }, 100);
            }
        }).observe(document.body, {childList: true, subtree: true, characterData: true});
    }
}

if (typeof onUiLoaded === "function") {
    onUiLoaded(trainManagementStart);
}
