// Train Management: refresh the txt2img/img2img Lora cards when the tab reports a newly delivered LoRA.
// The tab keeps the text of #train_management_delivery_stamp (hidden by style.css) equal to its newest delivery;
// when that text changes, the hidden refresh buttons of the Lora cards are clicked, as the WebUI's own refresh
// does. No API call is made from here, so --api-auth does not get in the way.
// A classic script (the WebUI loads every javascript/*.js into one global scope): every global is prefixed.

var trainManagementStampId = "train_management_delivery_stamp";
var trainManagementRefreshIds = ["txt2img_lora_extra_refresh_internal", "img2img_lora_extra_refresh_internal"];
var trainManagementLastStamp = null;

function trainManagementStampText() {
    // Only the HTML value (gradio's .prose element): the block around it also holds gradio's progress timer,
    // whose text changes at every refresh. gradio 3 puts the id on both, gradio 4 on the block only.
    var id = "#" + trainManagementStampId;
    var stamp = gradioApp().querySelector(id + ".prose, " + id + " .prose");
    return stamp ? stamp.textContent.trim() : null;
}

function trainManagementRefreshLoraCards() {
    trainManagementRefreshIds.forEach(function(id) {
        var button = gradioApp().querySelector("#" + id);
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

onUiLoaded(function() {
    trainManagementCheckStamp();
    // onAfterUiUpdate (AUTOMATIC1111 1.6+, Forge) runs once after a burst of DOM changes; onUiUpdate on each.
    var onUpdate = typeof onAfterUiUpdate === "function" ? onAfterUiUpdate : onUiUpdate;
    onUpdate(trainManagementCheckStamp);
});
